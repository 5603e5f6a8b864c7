"""Demo cell detector quantized to int8 for CPU-only devices (smearsight export int8)."""
