"""Drive a Nextion HMI touch display directly, instead of a panel speaking the SmearSight protocol.

Nextion displays take ASCII instructions terminated by ``0xFF 0xFF 0xFF`` (``tState.txt="RUNNING"``) and
report touches as ``0x65 page component event 0xFF 0xFF 0xFF``. :class:`NextionCodec` plugs into
:class:`~smearsight.device.panel.link.PanelLink` (``PanelLink(port, codec=NextionCodec(), baudrate=9600)``):
status, counts, summaries and alerts become assignments to text components named in
:class:`NextionLayout`, and touches of the buttons named there become start/stop/freeze/capture commands,
dispatched to the same handlers as the binary protocol's. Return codes that mean the display rejected
an instruction (invalid component, variable, ...) are reported as ``display`` errors.

Written against the published Nextion instruction set; tested against a scripted display on a pty,
not a physical Nextion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smearsight.device.panel.framing import DecodeError, DecoderStats, Frame
from smearsight.device.panel.protocol import (
    Alert,
    AlertLevel,
    Capture,
    Counts,
    Freeze,
    FreezeMode,
    Message,
    Ping,
    StartSession,
    Status,
    StopSession,
    Summary,
    type_code,
)
from smearsight.plaintext import plain_text

TERMINATOR = b"\xff\xff\xff"
TOUCH_EVENT = 0x65
#: Nextion return codes that report an instruction the display could not execute
ERROR_CODES: dict[int, str] = {
    0x00: "invalid instruction",
    0x02: "invalid component id",
    0x03: "invalid page id",
    0x04: "invalid picture id",
    0x05: "invalid font id",
    0x06: "invalid file operation",
    0x09: "invalid CRC",
    0x11: "invalid baud rate",
    0x12: "invalid waveform id or channel",
    0x1A: "invalid variable name or attribute",
    0x1B: "invalid variable operation",
    0x1C: "assignment failed",
    0x1D: "EEPROM operation failed",
    0x1E: "invalid quantity of parameters",
    0x1F: "IO operation failed",
    0x20: "escape character invalid",
    0x23: "variable name too long",
    0x24: "serial buffer overflow",
}
#: informational return codes (reported to ``on_any`` handlers as nothing; just counted)
INFO_CODES = {0x01, 0x66, 0x70, 0x71, 0x86, 0x87, 0x88, 0x89, 0xFD, 0xFE}
#: what the display sends when it starts or resets
STARTUP = b"\x00\x00\x00"
#: records with binary fields (numbers, coordinates) have a fixed size, terminator included
_FIXED_SIZE = {0x65: 7, 0x67: 9, 0x68: 9, 0x71: 8}
_COLOURS = {AlertLevel.INFO: 65535, AlertLevel.WARNING: 65504, AlertLevel.ERROR: 63488}  # white, yellow, red


@dataclass
class NextionLayout:
    """Component names on the Nextion page, and which buttons mean which command.

    ``buttons`` maps ``(page id, component id)`` -> one of ``start``, ``stop``, ``freeze`` (toggle),
    ``capture``, ``ping``; a press (event 1) triggers it.
    """

    state: str = "tState"
    fps: str = "tFps"
    message: str = "tMsg"
    counts: str = "tCounts"
    total: str = "nTotal"
    summary: str = "tSummary"
    alert: str = "tAlert"
    max_text: int = 200
    buttons: dict[tuple[int, int], str] = field(
        default_factory=lambda: {(0, 1): "start", (0, 2): "stop", (0, 3): "freeze", (0, 4): "capture"}
    )


def _latin1(text: str) -> str:
    """``text`` in Latin-1 for the display's font (see :func:`plain_text`); "ÿ" is byte 0xFF, the instruction
    terminator's, so it becomes "y"."""
    return plain_text(str(text).replace("ÿ", "y"), 256)


def quote(text: str, limit: int = 200) -> str:
    """A Nextion string literal: escaped quotes and backslashes, newlines as ``\\r``, Latin-1 only."""
    text = _latin1(text)[:limit]
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\r\n", "\n").replace("\n", "\\r")
    return f'"{text}"'


def instructions(message: Message, layout: NextionLayout) -> list[str]:
    """The Nextion instructions that show ``message`` (empty for messages a display has no use for)."""
    lay, lim = layout, layout.max_text
    if isinstance(message, Status):
        out = [f"{lay.state}.txt={quote(message.state.name, lim)}", f'{lay.fps}.txt="{message.fps:.1f}"']
        return out + [f"{lay.message}.txt={quote(message.text, lim)}"]
    if isinstance(message, Counts):
        body = "\n".join(f"{name}: {n}" for name, n in message.counts.items())
        return [f"{lay.counts}.txt={quote(body, lim)}", f"{lay.total}.val={sum(message.counts.values())}"]
    if isinstance(message, Summary):
        body = f"{message.session_id}: {message.frames} frames, {message.duration_s:.0f} s\n" + "\n".join(
            f"{name}: {n}" for name, n in message.counts.items()
        )
        return [f"{lay.summary}.txt={quote(body, lim)}"]
    if isinstance(message, Alert):
        return [f"{lay.alert}.pco={_COLOURS[message.level]}", f"{lay.alert}.txt={quote(message.text, lim)}"]
    return []


class NextionDecoder:
    """Splits the display's output on ``FF FF FF``; touches become panel commands, errors are reported."""

    def __init__(self, layout: NextionLayout, max_len: int = 256) -> None:
        self.layout = layout
        self.max_len = max_len
        self.stats = DecoderStats()
        self._buf = bytearray()
        self._seq = 0

    def reset(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes) -> list[Frame | DecodeError]:
        self.stats.bytes += len(data)
        self._buf += data
        events: list[Frame | DecodeError] = []
        while True:
            size = _FIXED_SIZE.get(self._buf[0]) if self._buf else None
            if size is not None and len(self._buf) < size:
                return events  # a fixed-size record (its binary data may contain FF bytes): wait for all of it
            if size is not None and self._buf[size - 3 : size] == TERMINATOR:
                end = size - 3
            else:
                end = self._buf.find(TERMINATOR)
            if end < 0:
                if len(self._buf) > self.max_len:
                    events.append(self._error("oversized", f"{len(self._buf)} bytes without FF FF FF", len(self._buf)))
                    self._buf.clear()
                return events
            record = bytes(self._buf[:end])
            del self._buf[: end + len(TERMINATOR)]
            if record:
                event = self._decode(record)
                if event is not None:
                    events.append(event)

    def _error(self, kind: str, detail: str, nbytes: int) -> DecodeError:
        counter = {"display": "display_errors", "garbage": "garbage", "oversized": "oversized"}[kind]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.garbage_bytes += nbytes
        return DecodeError(kind, detail, nbytes)

    def _decode(self, record: bytes) -> Frame | DecodeError | None:
        n = len(record) + len(TERMINATOR)
        code = record[0]
        if code == TOUCH_EVENT and len(record) == 4:
            page, component, pressed = record[1], record[2], record[3]
            word = self.layout.buttons.get((page, component))
            if not pressed or word is None:
                return None  # a release, or a touch on something that is not a command button
            message = _COMMAND[word]()
            self._seq = (self._seq + 1) & 0xFFFF
            self.stats.frames += 1
            return Frame(0, type_code(message), self._seq, message, n)
        if code in ERROR_CODES and len(record) == 1:
            return self._error("display", f"display says: {ERROR_CODES[code]} (0x{code:02x})", n)
        if code in INFO_CODES or record == STARTUP:
            return None
        return self._error("garbage", f"{len(record)} bytes that are no Nextion return data", n)


_COMMAND = {
    "start": StartSession,
    "stop": StopSession,
    "freeze": lambda: Freeze(FreezeMode.TOGGLE),
    "capture": Capture,
    "ping": Ping,
}


class NextionCodec:
    """Codec for :class:`~smearsight.device.panel.link.SerialLink` that talks to a Nextion display."""

    def __init__(self, layout: NextionLayout | None = None) -> None:
        self.layout = layout or NextionLayout()
        unknown = sorted(set(self.layout.buttons.values()) - set(_COMMAND))
        if unknown:
            raise ValueError(f"NextionLayout.buttons: unknown command(s) {unknown}; expected one of {sorted(_COMMAND)}")

    def prepare(self, message: Message) -> bytes:
        return b"".join(cmd.encode("latin-1") + TERMINATOR for cmd in instructions(message, self.layout))

    def wire(self, code: int, prepared: bytes, seq: int) -> bytes:
        return prepared

    def new_decoder(self) -> NextionDecoder:
        return NextionDecoder(self.layout)
