"""Lightning callbacks: the anomaly-map picture grid."""

from kdad.callbacks.visualizer import AnomalyMapGrid, render_grid

__all__ = ["AnomalyMapGrid", "render_grid"]
