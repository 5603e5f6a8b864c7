"""Panel protocol: COBS (against the ``cobs`` package), CRC32 (against binascii), messages, stream decoder."""

from __future__ import annotations

import binascii
import random
import struct

import pytest

from smearsight.device.panel.framing import (
    MAX_ENCODED,
    CobsError,
    DecodeError,
    Frame,
    FrameDecoder,
    build_raw_frame,
    cobs_decode,
    cobs_encode,
    crc32,
    encode_frame,
    frame_bytes,
)
from smearsight.device.panel.protocol import (
    HEADER,
    MAX_CLASSES,
    MAX_NAME,
    PROTOCOL_VERSION,
    Alert,
    AlertLevel,
    Capture,
    Counts,
    Freeze,
    FreezeMode,
    MsgType,
    Ping,
    Pong,
    RunState,
    StartSession,
    Status,
    StopSession,
    Summary,
    UnknownMessage,
    describe,
)

ALL_MESSAGES = [
    Status(RunState.RUNNING, 29.5, 1234, "S-0001", "all good"),
    Status(RunState.ERROR, 0.0, 0, "", "camera lost — reconnecting"),
    Counts({"sertoli": 3, "primary_spermatocyte": 0, "mature_sperm": 41}, "S-0001", 77),
    Summary("S-0001", 612.25, 18000, 4, {"sertoli": 30, "mature_sperm": 410}, "rolled back to 1.2.0"),
    Alert(AlertLevel.ERROR, "Kamera getrennt / caméra déconnectée", 17),
    Pong(0xFFFFFFFF),
    StartSession("slide 12/B"),
    StopSession(),
    Freeze(FreezeMode.ON),
    Freeze(FreezeMode.TOGGLE),
    Capture(),
    Ping(42),
]


def _reference_cobs():
    return pytest.importorskip("cobs.cobs", reason="the `cobs` package is the independent COBS reference")


def _edge_cases() -> list[bytes]:
    cases = [b"", b"\x00", b"\x00\x00", b"\x11\x00\x22", b"\x00\x11\x00"]
    for n in (1, 253, 254, 255, 508, 509, 1000):
        cases += [b"\x01" * n, b"\x01" * n + b"\x00", b"\x00" + b"\x01" * n]
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(0, 1200)
        zero_rate = rng.choice([0.0, 0.001, 0.05, 0.5])
        cases.append(bytes(0 if rng.random() < zero_rate else rng.randint(1, 255) for _ in range(n)))
    return cases


def test_cobs_matches_reference_package() -> None:
    ref = _reference_cobs()
    for data in _edge_cases():
        enc = cobs_encode(data)
        assert enc == ref.encode(data), len(data)
        assert 0 not in enc
        assert cobs_decode(enc) == data
        assert cobs_decode(ref.encode(data)) == data


def test_cobs_decode_rejects_invalid() -> None:
    with pytest.raises(CobsError):
        cobs_decode(b"\x05\x01\x02")  # block claims 4 bytes, 2 present
    with pytest.raises(CobsError):
        cobs_decode(b"\x03\x01\x00")  # zero inside
    with pytest.raises(CobsError):
        cobs_decode(b"\x00")


def test_crc_and_header_layout() -> None:
    raw = build_raw_frame(MsgType.PING, struct.pack(">I", 9), seq=0x1234)
    assert raw[: HEADER.size] == bytes([PROTOCOL_VERSION, 0x85, 0x12, 0x34, 0x00, 0x04])
    assert int.from_bytes(raw[-4:], "big") == binascii.crc32(raw[:-4]) == crc32(raw[:-4])
    wire = frame_bytes(MsgType.PING, struct.pack(">I", 9), seq=0x1234)
    assert wire[0] == 0 and wire[-1] == 0 and 0 not in wire[1:-1]
    assert cobs_decode(wire[1:-1]) == raw


@pytest.mark.parametrize("message", ALL_MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message) -> None:
    decoder = FrameDecoder()
    events = decoder.feed(encode_frame(message, seq=65535))
    assert len(events) == 1 and isinstance(events[0], Frame)
    frame = events[0]
    assert frame.message == message and type(frame.message) is type(message)
    assert frame.seq == 65535 and frame.version == PROTOCOL_VERSION
    assert decoder.stats.frames == 1 and decoder.stats.errors == 0
    assert describe(frame.message)["type"] == MsgType(message.TYPE).name


def test_float_and_long_strings() -> None:
    long_text = "é" * 500  # 1000 UTF-8 bytes: cut to the 240-byte field limit on a character boundary
    msg = Status(RunState.RUNNING, 1 / 3, 7, "x" * 100, long_text)
    (frame,) = FrameDecoder().feed(encode_frame(msg, 1))
    assert frame.message.text == "é" * 120
    assert frame.message.session_id == "x" * 64
    assert frame.message.fps == pytest.approx(1 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="classes"):
        Counts({f"c{i}": i for i in range(MAX_CLASSES + 1)}).encode_payload()
    # the largest legal counts message still fits
    with pytest.raises(ValueError, match="longer than"):
        Counts({"n" * (MAX_NAME + 1): 1}).encode_payload()
    big = Summary("s" * 64, 1.0, 1, 1, {f"{i:02d}" + "n" * (MAX_NAME - 2): i for i in range(MAX_CLASSES)}, "z" * 300)
    (frame,) = FrameDecoder().feed(encode_frame(big, 1))
    assert len(frame.message.counts) == MAX_CLASSES


def _stream(*messages, start_seq: int = 0) -> list[bytes]:
    return [encode_frame(m, start_seq + i) for i, m in enumerate(messages)]


def _frames(events) -> list:
    return [e.message for e in events if isinstance(e, Frame)]


def _errors(events) -> list[DecodeError]:
    return [e for e in events if isinstance(e, DecodeError)]


def test_corrupted_byte_is_a_crc_error_and_next_frame_decodes() -> None:
    a, b, c = _stream(Ping(1), Status(RunState.RUNNING, 30.0, 5, "", "ok"), Ping(3))
    bad = bytearray(b)
    # flip a payload byte that is not a COBS code byte (the 'o' of "ok")
    bad[bad.index(b"ok")] ^= 0x20
    decoder = FrameDecoder()
    events = decoder.feed(a + bytes(bad) + c)
    assert _frames(events) == [Ping(1), Ping(3)]
    (err,) = _errors(events)
    assert err.kind == "crc" and err.seq == 1 and err.type_code == MsgType.STATUS
    assert decoder.stats.crc_errors == 1 and decoder.stats.garbage_bytes == err.nbytes > 0


def test_garbage_between_frames_and_byte_by_byte_feeding() -> None:
    a, b = _stream(Counts({"a": 1}), Alert(AlertLevel.INFO, "hi"))
    noise = b"AT+RESET\r\n\xff\xfe garbage"
    data = noise + a + b"\x13\x37" + b + noise
    decoder = FrameDecoder()
    events = []
    for i in range(len(data)):  # one byte at a time, as a slow UART delivers it
        events += decoder.feed(data[i : i + 1])
    assert _frames(events) == [Counts({"a": 1}), Alert(AlertLevel.INFO, "hi")]
    assert decoder.stats.garbage == 2  # leading noise, the two stray bytes; trailing noise still pending
    assert decoder.stats.garbage_bytes == len(noise) + 1 + 2 + 1
    events = decoder.feed(b"\x00")
    assert [e.kind for e in _errors(events)] == ["garbage"]


def test_truncated_frames() -> None:
    good = Summary("S1", 10.0, 300, 2, {"sertoli": 3}, "done")
    raw = build_raw_frame(MsgType.SUMMARY, good.encode_payload(), 9)
    # sender died mid-frame: the bytes that made it (COBS re-encoded, so COBS itself is valid)
    cut = b"\x00" + cobs_encode(raw[:-7]) + b"\x00"
    # line dropped the tail of an encoded frame
    wire = encode_frame(good, 10)
    dropped = wire[: len(wire) // 2]
    decoder = FrameDecoder()
    events = decoder.feed(cut + dropped + encode_frame(Ping(5), 11))
    kinds = [e.kind for e in _errors(events)]
    assert kinds[0] == "truncated" and len(kinds) == 2 and kinds[1] in {"truncated", "garbage", "crc"}
    assert _frames(events) == [Ping(5)]
    assert decoder.stats.truncated >= 1


def test_oversized_run_is_discarded_and_decoder_recovers() -> None:
    decoder = FrameDecoder()
    junk = bytes(range(1, 256)) * ((MAX_ENCODED * 3) // 255)
    events = decoder.feed(junk[:5000]) + decoder.feed(junk[5000:]) + decoder.feed(encode_frame(Ping(1), 0))
    (err,) = _errors(events)
    assert err.kind == "oversized" and err.nbytes == len(junk)
    assert _frames(events) == [Ping(1)]
    assert len(decoder._buf) == 0  # memory stays bounded


def test_too_large_payload_refused_at_encode() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        frame_bytes(MsgType.ALERT, b"x" * 5000, 0)


def test_unknown_version_and_type_are_reported_not_fatal() -> None:
    future = frame_bytes(MsgType.PING, b"\x00\x00\x00\x01", 3, version=PROTOCOL_VERSION + 1)
    unknown = frame_bytes(0x42, b"\x01\x02\x03", 4)
    malformed = frame_bytes(MsgType.PING, b"\x01", 5)  # a ping needs 4 bytes
    bad_enum = frame_bytes(MsgType.FREEZE, b"\x09", 6)
    decoder = FrameDecoder()
    events = decoder.feed(future + unknown + malformed + bad_enum + encode_frame(Pong(8), 7))
    errs = _errors(events)
    assert [e.kind for e in errs] == ["version", "malformed", "malformed"]
    assert "version 2" in errs[0].detail
    msgs = _frames(events)
    assert msgs[0] == UnknownMessage(type_code=0x42, payload=b"\x01\x02\x03")
    assert msgs[1] == Pong(8)
    assert decoder.stats.unknown_types == 1 and decoder.stats.version_errors == 1
    assert describe(msgs[0])["type"] == "0x42"


def test_random_noise_never_raises_and_resyncs() -> None:
    rng = random.Random(1)
    decoder = FrameDecoder()
    good = 0
    for i in range(200):
        noise = bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 80)))
        events = decoder.feed(noise + encode_frame(Ping(i), i))
        good += sum(1 for m in _frames(events) if m == Ping(i))
    # the leading delimiter closes the noise before every frame, so every frame survives
    assert good == 200
    assert decoder.stats.errors > 0
