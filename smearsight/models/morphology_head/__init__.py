"""Demo morphology model (head part)."""
