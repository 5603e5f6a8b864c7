"""Serial link to an attached panel/controller (COBS framing + CRC32)."""
