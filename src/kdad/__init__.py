"""kdad: knowledge-distillation anomaly detection on PyTorch Lightning + Hydra."""

from kdad.errors import KdadError

__version__ = "0.1.0"

__all__ = ["KdadError", "__version__"]
