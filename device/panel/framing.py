"""COBS framing with CRC32 and a resynchronising stream decoder.

On the wire every frame is ``0x00 + COBS(header + payload + crc32) + 0x00``. COBS removes every zero
byte from the frame, so a zero always means "frame boundary": after corrupted bytes, a cut frame or
line noise the receiver loses at most the frame in which it happened. The leading zero closes whatever
garbage came before, so the next frame is never glued to it.

COBS is written out here (it is 30 lines) rather than taken from the ``cobs`` package, so that the
device install needs nothing beyond pyserial; the tests check it against ``cobs`` as a reference.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields
from typing import Protocol

from smearsight.device.panel.protocol import (
    CRC_SIZE,
    HEADER,
    MAX_FRAME,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Message,
    PayloadError,
    UnknownMessage,
    decode_message,
    type_code,
    type_name,
)

DELIMITER = b"\x00"
#: Longest COBS-encoded frame (one overhead byte per 254 data bytes, plus one).
MAX_ENCODED = MAX_FRAME + MAX_FRAME // 254 + 2


class CobsError(ValueError):
    """Bytes that are not a valid COBS encoding."""


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: the result has no zero bytes (no delimiter appended)."""
    out = bytearray()
    segments = bytes(data).split(b"\x00")
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        full_blocks = False
        while len(seg) >= 254:
            out.append(0xFF)
            out += seg[:254]
            seg = seg[254:]
            full_blocks = True
        if i == last and full_blocks and not seg:
            break  # a final run of exactly k*254 bytes needs no closing code byte
        out.append(len(seg) + 1)
        out += seg
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of :func:`cobs_encode`; raises :class:`CobsError` on a zero byte or a cut block."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise CobsError(f"zero byte at offset {i}")
        end = i + code
        if end > n:
            raise CobsError(f"block at offset {i} needs {code - 1} bytes, only {n - i - 1} left")
        block = data[i + 1 : end]
        if 0 in block:
            raise CobsError(f"zero byte inside block at offset {i}")
        out += block
        i = end
        if code < 0xFF and i < n:
            out.append(0)
    return bytes(out)


def crc32(data: bytes) -> int:
    """CRC32 (zlib polynomial) as an unsigned 32-bit integer."""
    return zlib.crc32(data) & 0xFFFFFFFF


def build_raw_frame(code: int, payload: bytes, seq: int, version: int = PROTOCOL_VERSION) -> bytes:
    """Header + payload + CRC32, before COBS (exposed for tests that forge odd frames)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    body = HEADER.pack(version & 0xFF, code & 0xFF, seq & 0xFFFF, len(payload)) + payload
    return body + crc32(body).to_bytes(CRC_SIZE, "big")


def frame_bytes(code: int, payload: bytes, seq: int, version: int = PROTOCOL_VERSION) -> bytes:
    """The bytes to write on the wire for one frame (delimiters included)."""
    return DELIMITER + cobs_encode(build_raw_frame(code, payload, seq, version)) + DELIMITER


def encode_frame(message: Message, seq: int) -> bytes:
    """Encode ``message`` with sequence number ``seq`` into wire bytes."""
    return frame_bytes(type_code(message), message.encode_payload(), seq)


@dataclass
class Frame:
    """A decoded, CRC-checked frame."""

    version: int
    type_code: int
    seq: int
    message: Message
    size: int  # bytes on the wire, delimiter included

    @property
    def type_name(self) -> str:
        return type_name(self.type_code)


@dataclass
class DecodeError:
    """Something on the wire that was not a good frame; reported and counted, never raised.

    ``kind`` is one of: ``crc`` (CRC mismatch, length consistent), ``truncated`` (the header announces
    more payload than arrived), ``garbage`` (not COBS or too short to be a frame), ``oversized`` (no
    delimiter within the longest legal frame), ``version`` (a protocol version this side does not
    speak), ``malformed`` (good CRC, but the payload does not parse as its type).
    """

    kind: str
    detail: str
    nbytes: int
    type_code: int | None = None
    seq: int | None = None


@dataclass
class DecoderStats:
    """Receive counters of a stream decoder (good frames, each kind of error, bytes)."""

    frames: int = 0
    bytes: int = 0
    crc_errors: int = 0
    truncated: int = 0
    garbage: int = 0
    oversized: int = 0
    version_errors: int = 0
    malformed: int = 0
    unknown_types: int = 0
    #: errors reported by a display (Nextion return codes such as "invalid variable")
    display_errors: int = 0
    #: bytes thrown away by every kind of error
    garbage_bytes: int = 0

    @property
    def errors(self) -> int:
        return self.crc_errors + self.truncated + self.garbage + self.oversized + self.version_errors + self.malformed

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_KIND_COUNTER = {
    "crc": "crc_errors",
    "truncated": "truncated",
    "garbage": "garbage",
    "oversized": "oversized",
    "version": "version_errors",
    "malformed": "malformed",
    "display": "display_errors",
}


class FrameDecoder:
    """Turns a byte stream into :class:`Frame` and :class:`DecodeError` events (not thread-safe)."""

    def __init__(self, max_encoded: int = MAX_ENCODED) -> None:
        self.max_encoded = max_encoded
        self.stats = DecoderStats()
        self._buf = bytearray()
        self._overflow = 0  # bytes discarded from an over-long run without delimiter

    def reset(self) -> None:
        """Forget a partial frame (after the port was reopened)."""
        self._buf.clear()
        self._overflow = 0

    def feed(self, data: bytes) -> list[Frame | DecodeError]:
        """Consume ``data``; return the events completed by it, in order."""
        self.stats.bytes += len(data)
        events: list[Frame | DecodeError] = []
        start = 0
        while True:
            z = data.find(0, start)
            piece = data[start:] if z < 0 else data[start:z]
            if self._overflow:
                self._overflow += len(piece)
            else:
                self._buf += piece
                if len(self._buf) > self.max_encoded:
                    self._overflow = len(self._buf)
                    self._buf.clear()
            if z < 0:
                return events
            if self._overflow:
                events.append(
                    self._error("oversized", f"{self._overflow} bytes without a frame delimiter", self._overflow)
                )
                self._overflow = 0
            elif self._buf:
                events.append(self._decode(bytes(self._buf)))
                self._buf.clear()
            start = z + 1

    def _error(self, kind: str, detail: str, nbytes: int, code: int | None = None, seq: int | None = None):
        counter = _KIND_COUNTER[kind]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self.stats.garbage_bytes += nbytes
        return DecodeError(kind, detail, nbytes, code, seq)

    def _decode(self, chunk: bytes) -> Frame | DecodeError:
        n = len(chunk) + 1
        try:
            raw = cobs_decode(chunk)
        except CobsError as exc:
            return self._error("garbage", f"not a frame ({exc})", n)
        if len(raw) < HEADER.size + CRC_SIZE:
            return self._error("garbage", f"{len(raw)} bytes, shorter than any frame", n)
        version, code, seq, length = HEADER.unpack_from(raw)
        body, crc = raw[:-CRC_SIZE], int.from_bytes(raw[-CRC_SIZE:], "big")
        available = len(body) - HEADER.size
        if crc32(body) != crc:
            if length == available:
                return self._error("crc", f"CRC mismatch in {type_name(code)} seq {seq}", n, code, seq)
            if version == PROTOCOL_VERSION and length > available:
                return self._error(
                    "truncated", f"{type_name(code)} seq {seq}: {available} of {length} payload bytes", n, code, seq
                )
            return self._error("garbage", f"{len(raw)} bytes with a bad CRC", n)
        if version != PROTOCOL_VERSION:
            return self._error(
                "version",
                f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
                n,
                code,
                seq,
            )
        if length != available:
            return self._error("malformed", f"header says {length} payload bytes, frame has {available}", n, code, seq)
        try:
            message = decode_message(code, body[HEADER.size :])
        except PayloadError as exc:
            return self._error("malformed", f"{type_name(code)} seq {seq}: {exc}", n, code, seq)
        self.stats.frames += 1
        if isinstance(message, UnknownMessage):
            self.stats.unknown_types += 1
        return Frame(version, code, seq, message, n)


class StreamDecoder(Protocol):
    stats: DecoderStats

    def feed(self, data: bytes) -> list[Frame | DecodeError]: ...

    def reset(self) -> None: ...


class Codec(Protocol):
    """How a :class:`~smearsight.device.panel.link.SerialLink` turns messages into bytes and back."""

    def prepare(self, message: Message) -> bytes:
        """Serialise ``message`` on the caller's thread (raises ValueError for a message that cannot fit)."""
        ...

    def wire(self, code: int, prepared: bytes, seq: int) -> bytes:
        """The bytes to write for a prepared message (on the writer thread)."""
        ...

    def new_decoder(self) -> StreamDecoder: ...


class BinaryCodec:
    """The SmearSight panel protocol: COBS frames with header and CRC32."""

    def prepare(self, message: Message) -> bytes:
        payload = message.encode_payload()
        if len(payload) > MAX_PAYLOAD:
            raise ValueError(f"{type_name(type_code(message))}: payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
        return payload

    def wire(self, code: int, prepared: bytes, seq: int) -> bytes:
        return frame_bytes(code, prepared, seq)

    def new_decoder(self) -> FrameDecoder:
        return FrameDecoder()
