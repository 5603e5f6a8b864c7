"""Small demo models shipped with the package (see docs/models.md for how they were trained)."""
