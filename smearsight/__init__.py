"""SmearSight: cell detection and sperm morphology at the microscope."""

__version__ = "0.1.0"
