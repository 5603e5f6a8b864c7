"""Text for fonts with few characters: OpenCV's Hershey fonts (ASCII) and a Nextion display's (Latin-1)."""

from __future__ import annotations

import unicodedata

#: characters outside a font's range, as plain ones (used only where the font lacks the character)
_PLAIN = {"—": "-", "–": "-", "‘": "'", "’": "'", "“": '"', "”": '"', "…": "...", "•": "*", "·": "-",
          "°": " deg", "µ": "u", "×": "x"}


def plain_text(text: str, below: int = 128) -> str:
    """``text`` in the characters whose code is below ``below`` (128: ASCII, 256: Latin-1): punctuation and
    symbols the font lacks mapped to plain characters, accents dropped (ř -> r), anything else '?'."""
    text = str(text)
    if all(ord(ch) < below for ch in text):
        return text
    return "".join(ch if ord(ch) < below else _plain_char(ch, below) for ch in text)


def _plain_char(ch: str, below: int) -> str:
    if ch in _PLAIN:
        return _PLAIN[ch]
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if ord(c) < below)
    return base or "?"
