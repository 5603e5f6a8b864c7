"""Sperm morphology by knowledge distillation: frozen teacher, compact student, discrepancy score.

Heavy modules (torch, timm) are imported lazily; ``cli`` registers the ``train morphology`` and
``eval morphology`` commands.
"""
