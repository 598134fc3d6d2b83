"""Exact anomaly-detection metrics (``specs/metrics.md``).

Functional API (NumPy arrays or torch tensors on any device in, Python floats out):
image_auroc, image_ap, f1_max, pixel_auroc, pixel_ap, pixel_f1_max, aupro, rd_legacy_pro and
evaluate (the whole suite, pixel metrics from one shared sort). ``AnomalyMetrics`` wraps the
suite as a torchmetrics ``Metric`` that accumulates on the device and computes once.
"""

from __future__ import annotations

from kdad.metrics.functional import (
    aupro,
    evaluate,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)
from kdad.metrics.legacy import rd_legacy_pro
from kdad.metrics.metric import AnomalyMetrics

__all__ = [
    "AnomalyMetrics",
    "aupro",
    "evaluate",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "rd_legacy_pro",
]
