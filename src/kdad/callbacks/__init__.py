"""Lightning callbacks and loggers: the anomaly-map picture grid; the synthetic-anomaly preview;
the W&B logger that names runs after method-backbone-category and logs the final results."""

from kdad.callbacks.finite_loss import NonFiniteLossGuard
from kdad.callbacks.inference import InferenceOptimization
from kdad.callbacks.readout import TestSetSelectionReadout
from kdad.callbacks.synthesis_preview import SyntheticAnomalyPreview, render_synthetic_grid
from kdad.callbacks.thresholds import NormalThresholds
from kdad.callbacks.visual_report import VisualReport
from kdad.callbacks.visualizer import AnomalyMapGrid, render_grid
from kdad.callbacks.wandb import KdadWandbLogger

__all__ = [
    "AnomalyMapGrid",
    "InferenceOptimization",
    "KdadWandbLogger",
    "NonFiniteLossGuard",
    "NormalThresholds",
    "SyntheticAnomalyPreview",
    "TestSetSelectionReadout",
    "VisualReport",
    "render_grid",
    "render_synthetic_grid",
]
