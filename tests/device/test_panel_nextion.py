"""Nextion HMI adapter: instructions out, touch events in, over a real pty.

The display itself is the hardware edge we do not have: the test plays it on the pty master with
byte sequences from the published Nextion instruction set.
"""

from __future__ import annotations

import os
import select
import time
import tty

import pytest

from smearsight.device.panel.framing import DecodeError
from smearsight.device.panel.link import PanelLink
from smearsight.device.panel.nextion import NextionCodec, NextionDecoder, NextionLayout, instructions, quote
from smearsight.device.panel.protocol import (
    Alert,
    AlertLevel,
    Counts,
    Freeze,
    FreezeMode,
    MsgType,
    Pong,
    RunState,
    StartSession,
    Status,
    Summary,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")
FF3 = b"\xff\xff\xff"


def test_quote_escapes_for_nextion() -> None:
    assert quote('say "hi" \\ now\nnext') == '"say \\"hi\\" \\\\ now\\rnext"'
    assert quote("naïve ✓") == '"naïve ?"'  # Latin-1 font: what does not fit becomes '?'
    assert quote("x" * 500, limit=10) == '"xxxxxxxxxx"'


def test_instructions_for_runtime_messages() -> None:
    lay = NextionLayout()
    assert instructions(Status(RunState.FROZEN, 12.345, 3, "", "ok"), lay) == [
        'tState.txt="FROZEN"',
        'tFps.txt="12.3"',
        'tMsg.txt="ok"',
    ]
    assert instructions(Counts({"sertoli": 2, "mature_sperm": 5}), lay) == [
        'tCounts.txt="sertoli: 2\\rmature_sperm: 5"',
        "nTotal.val=7",
    ]
    assert instructions(Alert(AlertLevel.ERROR, "camera lost"), lay) == ["tAlert.pco=63488", 'tAlert.txt="camera lost"']
    assert instructions(Summary("S1", 61.0, 100, 0, {"a": 1}), lay) == ['tSummary.txt="S1: 100 frames, 61 s\\ra: 1"']
    assert instructions(Pong(1), lay) == []


def test_decoder_touch_errors_and_binary_numbers() -> None:
    dec = NextionDecoder(NextionLayout())
    records = [
        b"\x88",  # ready after power-on
        b"\x65\x00\x01\x01",  # press b1 -> start
        b"\x65\x00\x01\x00",  # release: ignored
        b"\x71\xff\xff\xff\xff",  # numeric -1: its FF bytes must not split the record
        b"\x1a",  # invalid variable
        b"junk",
        b"\x65\x00\x03\x01",  # freeze toggle
    ]
    data = b"".join(r + FF3 for r in records)
    events = []
    for i in range(0, len(data), 3):
        events += dec.feed(data[i : i + 3])
    msgs = [e.message for e in events if not isinstance(e, DecodeError)]
    errs = [e for e in events if isinstance(e, DecodeError)]
    assert msgs == [StartSession(), Freeze(FreezeMode.TOGGLE)]
    assert [(e.kind, "invalid variable" in e.detail) for e in errs] == [("display", True), ("garbage", False)]
    assert dec.stats.display_errors == 1 and dec.stats.garbage == 1 and dec.stats.frames == 2
    assert dec.feed(b"\x01" * 300) and dec.stats.oversized == 1


def test_bad_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="dance"):
        NextionCodec(NextionLayout(buttons={(0, 1): "dance"}))


def test_panel_link_drives_a_nextion_over_a_pty() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    link = PanelLink(os.ttyname(slave), codec=NextionCodec(), baudrate=9600)
    started, frozen, errors = [], [], []
    link.on(MsgType.START_SESSION, started.append)
    link.on(MsgType.FREEZE, lambda f: frozen.append(f.message.mode))
    link.on_error(errors.append)
    received = bytearray()
    try:
        with link:
            assert link.wait_connected(2)
            link.send(Pong(3))  # nothing to show on a display: writes nothing
            link.send_status(RunState.RUNNING, 29.97, 10, "S1", "all good")
            link.send_alert("focus drifting", AlertLevel.WARNING)
            deadline = time.monotonic() + 5
            while received.count(FF3) < 5 and time.monotonic() < deadline:
                if select.select([master], [], [], 0.05)[0]:
                    received += os.read(master, 4096)
            os.write(master, b"\x65\x00\x01\x01" + FF3 + b"\x65\x00\x03\x01" + FF3 + b"\x02" + FF3)
            deadline = time.monotonic() + 5
            while (len(started) < 1 or len(frozen) < 1 or len(errors) < 1) and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        os.close(master)
        os.close(slave)
    assert bytes(received).split(FF3)[:-1] == [
        b'tState.txt="RUNNING"',
        b'tFps.txt="30.0"',
        b'tMsg.txt="all good"',
        b"tAlert.pco=65504",
        b'tAlert.txt="focus drifting"',
    ]
    assert len(started) == 1 and frozen == [FreezeMode.TOGGLE]
    assert errors[0].kind == "display" and "invalid component id" in errors[0].detail
    assert link.stats.sent == 2  # the pong was not written
