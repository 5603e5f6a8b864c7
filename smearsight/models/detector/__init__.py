"""Demo cell detector (EfficientDet-Lite0, synthetic smears)."""
