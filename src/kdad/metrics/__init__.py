"""Exact anomaly-detection metrics (``specs/metrics.md``).

Functional API (NumPy arrays or torch tensors on any device in, Python floats out):
image_auroc, image_ap, f1_max, pixel_auroc, pixel_ap, pixel_f1_max, aupro, rd_legacy_pro and
evaluate (the whole suite, pixel metrics from one shared sort); auroc_change_bound (how far
AUROC can move when every score moves by at most d: the tolerance for comparing two forward
passes). ``AnomalyMetrics`` wraps the
suite as a torchmetrics ``Metric`` that accumulates on the device and computes once.
Curves whose areas are those metrics, and the F1-optimal thresholds: :mod:`kdad.metrics.curves`.
"""

from __future__ import annotations

from kdad.metrics.curves import (
    Curve,
    MetricCurves,
    evaluate_with_curves,
    f1_max_threshold,
    precision_recall_curve,
    pro_curve,
    roc_curve,
)
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
from kdad.metrics.stability import auroc_change_bound

__all__ = [
    "AnomalyMetrics",
    "Curve",
    "MetricCurves",
    "aupro",
    "auroc_change_bound",
    "evaluate",
    "evaluate_with_curves",
    "f1_max",
    "f1_max_threshold",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "precision_recall_curve",
    "pro_curve",
    "rd_legacy_pro",
    "roc_curve",
]
