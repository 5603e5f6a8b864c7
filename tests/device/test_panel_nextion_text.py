"""Text a Nextion display is sent: what the runtime's messages contain beyond Latin-1."""

from __future__ import annotations

from smearsight.device.panel.nextion import NextionCodec, quote
from smearsight.device.panel.protocol import RunState, Status


def test_typographic_punctuation_and_accents_reach_a_latin1_display_readable() -> None:
    # the sources' own status line: before, the dash arrived as "?" ("camera lost ? retrying in 4 s")
    assert quote("camera lost — retrying in 4 s") == '"camera lost - retrying in 4 s"'
    assert quote("‘slide’ “3” 1–2 wait…") == "\"'slide' \\\"3\\\" 1-2 wait...\""
    assert quote("Dvořák, Łukasz, Bräuer 5 µm") == '"Dvorák, ?ukasz, Bräuer 5 µm"'  # Latin-1 stays as it is
    assert quote("wait…", limit=6) == '"wait.."'  # the limit counts what is shown


def test_no_text_can_put_the_terminator_byte_inside_an_instruction() -> None:
    wire = NextionCodec().prepare(Status(RunState.RUNNING, 1.0, 0, "", "ÿÿÿ tMsg.txt=\"x\""))
    instructions = wire.split(b"\xff\xff\xff")
    assert instructions[-1] == b"" and len(instructions) == 4  # three instructions, none cut short
    assert instructions[2].startswith(b'tMsg.txt="yyy ')


def test_a_display_powering_up_is_not_reported_as_garbage() -> None:
    from smearsight.device.panel.nextion import NextionDecoder, NextionLayout

    decoder = NextionDecoder(NextionLayout())
    ff3 = b"\xff\xff\xff"
    # what a Nextion sends when it starts or resets ("startup", then "ready"), then a real error
    events = decoder.feed(b"\x00\x00\x00" + ff3 + b"\x88" + ff3 + b"\x00" + ff3)
    assert [(e.kind, e.detail) for e in events] == [("display", "display says: invalid instruction (0x00)")]
    assert decoder.stats.garbage == 0 and decoder.stats.garbage_bytes == 4
