"""Serial link to an attached panel/controller: a versioned binary protocol (COBS framing + CRC32).

The runtime uses :class:`PanelLink` (non-blocking ``send_*``, command handlers, automatic reconnection);
``smearsight device serial-monitor`` and ``smearsight device panel-sim`` are the tools to watch and
to fake the panel. Wire format: :mod:`smearsight.device.panel.protocol`; framing:
:mod:`smearsight.device.panel.framing`.
"""

from smearsight.device.panel.framing import DecodeError, DecoderStats, Frame, FrameDecoder, encode_frame
from smearsight.device.panel.link import LinkState, LinkStats, PanelLink, SerialLink
from smearsight.device.panel.protocol import (
    PROTOCOL_VERSION,
    Alert,
    AlertLevel,
    Capture,
    Counts,
    Freeze,
    FreezeMode,
    Message,
    MsgType,
    Ping,
    Pong,
    RunState,
    StartSession,
    Status,
    StopSession,
    Summary,
    UnknownMessage,
)

__all__ = [
    "PROTOCOL_VERSION",
    "Alert",
    "AlertLevel",
    "Capture",
    "Counts",
    "DecodeError",
    "DecoderStats",
    "Frame",
    "FrameDecoder",
    "Freeze",
    "FreezeMode",
    "LinkState",
    "LinkStats",
    "Message",
    "MsgType",
    "PanelLink",
    "Ping",
    "Pong",
    "RunState",
    "SerialLink",
    "StartSession",
    "Status",
    "StopSession",
    "Summary",
    "UnknownMessage",
    "encode_frame",
]
