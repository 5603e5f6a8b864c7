"""plain_text: what the screen's Hershey fonts (ASCII) and a Nextion display (Latin-1) can show."""

from smearsight.plaintext import plain_text


def test_ascii_maps_punctuation_and_symbols_and_drops_accents() -> None:
    assert plain_text("camera lost — retrying…") == "camera lost - retrying..."
    assert plain_text("Spermatozoïde 37 °C × 2 µm") == "Spermatozoide 37  degC x 2 um"
    assert plain_text("细胞") == "??"
    assert plain_text("plain text") == "plain text"


def test_latin1_keeps_its_own_characters_and_maps_the_rest() -> None:
    assert plain_text("37 °C × 2 µm, é", 256) == "37 °C × 2 µm, é"
    assert plain_text("Dvořák “quoted” – ok", 256) == 'Dvorák "quoted" - ok'  # á is Latin-1, ř is not
    assert plain_text("✓", 256) == "?"
