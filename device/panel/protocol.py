"""Messages of the SmearSight panel protocol (version 1) and their binary payloads.

A frame, before COBS framing (see :mod:`smearsight.device.panel.framing`), is::

    version:u8  type:u8  seq:u16  length:u16  payload[length]  crc32:u32

all big-endian; the CRC32 (zlib polynomial) covers header and payload. Two rules hold for every future
version so that any receiver can report a frame it does not understand instead of choking on it: the
first byte is the protocol version and the last four bytes are the CRC32 of everything before them.

Runtime -> panel: :class:`Status`, :class:`Counts`, :class:`Summary`, :class:`Alert`, :class:`Pong`.
Panel -> runtime: :class:`StartSession`, :class:`StopSession`, :class:`Freeze`, :class:`Capture`,
:class:`Ping`. Payload fields are fixed-width integers/floats and length-prefixed UTF-8 strings; strings
longer than their field's limit are cut (on a character boundary), so a long alert text can never make
a frame too large.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">BBHH")
CRC_SIZE = 4
MAX_PAYLOAD = 2048
MAX_CLASSES = 32
MAX_NAME = 32  # bytes of UTF-8 per class name
#: Longest raw frame (header + payload + CRC) a receiver accepts.
MAX_FRAME = HEADER.size + MAX_PAYLOAD + CRC_SIZE


class MsgType(IntEnum):
    """Message type codes; panel -> runtime codes have the high bit set."""

    STATUS = 0x01
    COUNTS = 0x02
    SUMMARY = 0x03
    ALERT = 0x04
    PONG = 0x05
    START_SESSION = 0x81
    STOP_SESSION = 0x82
    FREEZE = 0x83
    CAPTURE = 0x84
    PING = 0x85


class RunState(IntEnum):
    """What the runtime is doing, as shown on the panel."""

    IDLE = 0
    RUNNING = 1
    FROZEN = 2
    ERROR = 3
    UPDATING = 4


class AlertLevel(IntEnum):
    INFO = 0
    WARNING = 1
    ERROR = 2


class FreezeMode(IntEnum):
    OFF = 0
    ON = 1
    TOGGLE = 2


class PayloadError(ValueError):
    """A payload that does not parse as its message type."""


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> None:
        self.buf += struct.pack(">B", v)

    def u16(self, v: int) -> None:
        self.buf += struct.pack(">H", v)

    def u32(self, v: int) -> None:
        self.buf += struct.pack(">I", v & 0xFFFFFFFF)

    def f32(self, v: float) -> None:
        self.buf += struct.pack(">f", v)

    def text(self, s: str, limit: int) -> None:
        raw = s.encode("utf-8")
        if len(raw) > limit:
            raw = raw[:limit].decode("utf-8", "ignore").encode("utf-8")
        self.u16(len(raw))
        self.buf += raw

    def counts(self, counts: dict[str, int]) -> None:
        if len(counts) > MAX_CLASSES:
            raise ValueError(f"counts: {len(counts)} classes, at most {MAX_CLASSES} fit in a frame")
        self.u8(len(counts))
        for name, n in counts.items():
            if len(name.encode("utf-8")) > MAX_NAME:
                raise ValueError(f"counts: class name {name[:40]!r} is longer than {MAX_NAME} bytes")
            self.text(name, MAX_NAME)
            self.u32(int(n))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise PayloadError(f"payload ends early (needed {n} bytes at offset {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self._take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self._take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self._take(4))[0]

    def f32(self) -> float:
        return struct.unpack(">f", self._take(4))[0]

    def text(self) -> str:
        n = self.u16()
        try:
            return self._take(n).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"text at offset {self.pos - n} is not UTF-8") from exc

    def counts(self) -> dict[str, int]:
        return {self.text(): self.u32() for _ in range(self.u8())}

    def end(self) -> None:
        if self.pos != len(self.data):
            raise PayloadError(f"{len(self.data) - self.pos} unexpected bytes after the payload")


def _enum(cls: type[IntEnum], value: int, what: str) -> IntEnum:
    try:
        return cls(value)
    except ValueError as exc:
        raise PayloadError(f"{what}: unknown value {value}") from exc


@dataclass
class Message:
    """Base class of every protocol message."""

    TYPE: ClassVar[int]

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def decode_payload(cls, payload: bytes) -> Message:
        _Reader(payload).end()
        return cls()


@dataclass
class Status(Message):
    """Runtime state for the panel's status line (sent often; the link keeps only the newest)."""

    TYPE: ClassVar[int] = MsgType.STATUS
    state: RunState = RunState.IDLE
    fps: float = 0.0
    frame: int = 0
    session_id: str = ""
    text: str = ""

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.u8(int(self.state))
        w.f32(self.fps)
        w.u32(self.frame)
        w.text(self.session_id, 64)
        w.text(self.text, 240)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Status:
        r = _Reader(payload)
        msg = cls(_enum(RunState, r.u8(), "state"), r.f32(), r.u32(), r.text(), r.text())
        r.end()
        return msg


@dataclass
class Counts(Message):
    """Per-class cell counts of the current session (or field)."""

    TYPE: ClassVar[int] = MsgType.COUNTS
    counts: dict[str, int] = field(default_factory=dict)
    session_id: str = ""
    frame: int = 0

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.text(self.session_id, 64)
        w.u32(self.frame)
        w.counts(self.counts)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Counts:
        r = _Reader(payload)
        session_id, frame = r.text(), r.u32()
        msg = cls(r.counts(), session_id, frame)
        r.end()
        return msg


@dataclass
class Summary(Message):
    """End-of-session summary: totals per class, frames, captured fields, duration."""

    TYPE: ClassVar[int] = MsgType.SUMMARY
    session_id: str = ""
    duration_s: float = 0.0
    frames: int = 0
    captures: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    note: str = ""

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.text(self.session_id, 64)
        w.f32(self.duration_s)
        w.u32(self.frames)
        w.u16(min(self.captures, 0xFFFF))
        w.counts(self.counts)
        w.text(self.note, 240)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Summary:
        r = _Reader(payload)
        msg = cls(r.text(), r.f32(), r.u32(), r.u16(), r.counts(), r.text())
        r.end()
        return msg


@dataclass
class Alert(Message):
    """A plain-words message for the operator (camera lost, model rolled back, ...)."""

    TYPE: ClassVar[int] = MsgType.ALERT
    level: AlertLevel = AlertLevel.INFO
    text: str = ""
    code: int = 0

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.u8(int(self.level))
        w.u16(self.code)
        w.text(self.text, 240)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, payload: bytes) -> Alert:
        r = _Reader(payload)
        level, code = _enum(AlertLevel, r.u8(), "level"), r.u16()
        msg = cls(level, r.text(), code)
        r.end()
        return msg


@dataclass
class _Nonce(Message):
    nonce: int = 0

    def encode_payload(self) -> bytes:
        return struct.pack(">I", self.nonce & 0xFFFFFFFF)

    @classmethod
    def decode_payload(cls, payload: bytes) -> _Nonce:
        r = _Reader(payload)
        msg = cls(r.u32())
        r.end()
        return msg


@dataclass
class Ping(_Nonce):
    """Panel asks whether the runtime is alive; answered by a :class:`Pong` with the same nonce."""

    TYPE: ClassVar[int] = MsgType.PING


@dataclass
class Pong(_Nonce):
    TYPE: ClassVar[int] = MsgType.PONG


@dataclass
class StartSession(Message):
    """Start a session (one slide); ``label`` is an optional slide/sample label typed on the panel."""

    TYPE: ClassVar[int] = MsgType.START_SESSION
    label: str = ""

    def encode_payload(self) -> bytes:
        w = _Writer()
        w.text(self.label, 64)
        return bytes(w.buf)

    @classmethod
    def decode_payload(cls, payload: bytes) -> StartSession:
        r = _Reader(payload)
        msg = cls(r.text())
        r.end()
        return msg


@dataclass
class StopSession(Message):
    TYPE: ClassVar[int] = MsgType.STOP_SESSION


@dataclass
class Freeze(Message):
    """Freeze (or unfreeze, or toggle) the displayed field."""

    TYPE: ClassVar[int] = MsgType.FREEZE
    mode: FreezeMode = FreezeMode.TOGGLE

    def encode_payload(self) -> bytes:
        return bytes([int(self.mode)])

    @classmethod
    def decode_payload(cls, payload: bytes) -> Freeze:
        r = _Reader(payload)
        msg = cls(_enum(FreezeMode, r.u8(), "mode"))
        r.end()
        return msg


@dataclass
class Capture(Message):
    """Capture the current field (image + detections) into the session record."""

    TYPE: ClassVar[int] = MsgType.CAPTURE


@dataclass
class UnknownMessage(Message):
    """A frame of a type this side does not know (a newer peer): kept raw and reported, never fatal."""

    TYPE: ClassVar[int] = -1
    type_code: int = 0
    payload: bytes = b""

    def encode_payload(self) -> bytes:
        return self.payload


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls for cls in (Status, Counts, Summary, Alert, Pong, StartSession, StopSession, Freeze, Capture, Ping)
}
RUNTIME_TO_PANEL = frozenset({MsgType.STATUS, MsgType.COUNTS, MsgType.SUMMARY, MsgType.ALERT, MsgType.PONG})
PANEL_TO_RUNTIME = frozenset(
    {MsgType.START_SESSION, MsgType.STOP_SESSION, MsgType.FREEZE, MsgType.CAPTURE, MsgType.PING}
)


def type_code(message: Message) -> int:
    """The wire type code of ``message`` (for :class:`UnknownMessage`, its raw code)."""
    return message.type_code if isinstance(message, UnknownMessage) else int(message.TYPE)


def type_name(code: int) -> str:
    """The message type's name (``STATUS``), or ``0x..`` for a code this side does not know."""
    try:
        return MsgType(code).name
    except ValueError:
        return f"0x{code:02x}"


def decode_message(code: int, payload: bytes) -> Message:
    """Build the message for ``code``; unknown codes give an :class:`UnknownMessage`.

    Raises :class:`PayloadError` when the payload does not parse as the known type.
    """
    cls = MESSAGE_TYPES.get(code)
    if cls is None:
        return UnknownMessage(type_code=code, payload=bytes(payload))
    return cls.decode_payload(bytes(payload))


def describe(message: Message) -> dict[str, object]:
    """A JSON-friendly dict of a message's fields (enums by name), for logs and the monitor."""
    out: dict[str, object] = {"type": type_name(type_code(message))}
    for key, value in vars(message).items():
        if isinstance(value, IntEnum):
            value = value.name
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, float):
            value = round(value, 3)
        out[key] = value
    return out
