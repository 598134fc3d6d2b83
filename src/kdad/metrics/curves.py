"""The curves behind the metrics (ROC, precision-recall, PRO) and the F1-optimal thresholds.

Every curve is built from the same sorted counts (:class:`~kdad.metrics.functional.
PositiveGroups`) that give AUROC, AP, F1-max and AU-PRO, so what is drawn is what is reported:

* ROC: (0, 0), the points just before and just after every tie group holding a positive,
  (1, 1). Between those groups the TPR is constant, so this is the exact ROC curve with its
  horizontal runs shortened to their ends; its trapezoid area is the AUROC (ties count 1/2).
* PR: one point (recall, precision) per tie group holding a positive (scikit-learn's
  ``precision_recall_curve`` at those thresholds); AP = sum (R_k - R_{k-1}) P_k, so the curve
  drawn as a step function (precision held from the previous recall) has area AP.
* PRO: the MVTec AD PRO curve (see :func:`kdad.metrics.aupro`) cut at the FPR limit with the
  interpolated end point; its trapezoid area divided by the limit is the AU-PRO.

Size: the curves have one or two points per distinct positive score. For plotting, at most
``max_points`` groups are kept (evenly spaced along the curve, first and last always kept;
a thinned curve looks the same at any figure size); ``area`` is always the exact metric.
Pixel curves of 1,700 maps of 256x256 are thus a few hundred KiB, made from the metric's own
sort with no second copy of the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdad.metrics.functional import (
    ArrayLike,
    MapsLike,
    PositiveGroups,
    _ap,
    _aupro,
    _auroc,
    _clip_to,
    _f1_max_threshold,
    _image_inputs,
    _pixel_groups,
    _pro_values,
    _staircase,
    evaluate,
    pixel_data,
    positive_groups,
)

__all__ = [
    "Curve",
    "MetricCurves",
    "evaluate_with_curves",
    "f1_max_threshold",
    "precision_recall_curve",
    "pro_curve",
    "roc_curve",
]

#: default number of tie groups kept per curve for plotting (exact below that)
MAX_POINTS = 4096

#: how results.json labels the thresholds chosen on the test set
TEST_SET_THRESHOLDS_LABEL = (
    "TEST-SET-DERIVED (optimistic): thresholds that maximise F1 on this test set "
    "(anomalous if score >= threshold); for analysis only, not for deployment "
    "(use normal_thresholds)"
)


@dataclass(frozen=True)
class Curve:
    """One curve: ``x``/``y`` in drawing order and the metric its area equals.

    ROC: x = FPR, y = TPR, area = AUROC. PR: x = recall, y = precision, area = AP (step-wise:
    draw with ``where="pre"``). PRO: x = FPR up to ``x_limit``, y = PRO, area = AU-PRO (the
    area divided by ``x_limit``). ``n_pos``/``n_neg``: positive/negative samples (images or
    pixels); ``exact``: False when the points were thinned for plotting.
    """

    x: np.ndarray
    y: np.ndarray
    area: float
    n_pos: int
    n_neg: int
    x_limit: float = 1.0
    exact: bool = True


@dataclass(frozen=True)
class MetricCurves:
    """All curves and F1-optimal thresholds of one evaluation (None where undefined: a level
    without positives or negatives, or pixel entries in image-only mode).

    Thresholds follow the metrics' rule ``score >= threshold`` is anomalous; they are chosen on
    the TEST SET (optimistic, for analysis only).
    """

    image_roc: Curve | None = None
    image_pr: Curve | None = None
    image_f1_threshold: float | None = None
    pixel_roc: Curve | None = None
    pixel_pr: Curve | None = None
    pixel_f1_threshold: float | None = None
    pro: Curve | None = None

    def test_set_thresholds(self) -> dict[str, Any]:
        """results.json's ``test_set_thresholds`` section (labelled as test-set derived)."""
        return {
            "label": TEST_SET_THRESHOLDS_LABEL,
            "image_f1_threshold": self.image_f1_threshold,
            "pixel_f1_threshold": self.pixel_f1_threshold,
        }


def _kept_groups(k: int, max_points: int | None) -> np.ndarray | None:
    """Evenly spaced group indices (first and last included), or None to keep all ``k``."""
    if max_points is None or k <= max_points:
        return None
    return np.unique(np.linspace(0, k - 1, max(2, max_points)).round().astype(np.int64))


def _roc(g: PositiveGroups, max_points: int | None, name: str) -> Curve | None:
    if g.n_pos == 0 or g.n_neg == 0:
        return None
    keep = _kept_groups(len(g.pos), max_points)
    fpr, tpr = _staircase(g, g.tp / g.n_pos, keep)
    return Curve(fpr, tpr, _auroc(g, name), g.n_pos, g.n_neg, exact=keep is None)


def _pr(g: PositiveGroups, max_points: int | None, name: str) -> Curve | None:
    if g.n_pos == 0:
        return None
    keep = _kept_groups(len(g.pos), max_points)
    tp = g.tp
    recall = tp / g.n_pos
    precision = tp / (g.above + g.size).astype(np.float64)
    if keep is not None:
        recall, precision = recall[keep], precision[keep]
    return Curve(recall, precision, _ap(g, name), g.n_pos, g.n_neg, exact=keep is None)


def _pro(g: PositiveGroups, n_regions: int, fpr_limit: float, max_points: int | None) -> Curve | None:
    if n_regions == 0 or g.n_neg == 0:
        return None
    keep = _kept_groups(len(g.pos), max_points)
    fpr, pro = _clip_to(*_staircase(g, _pro_values(g, n_regions), keep), fpr_limit)
    area = _aupro(g, n_regions, fpr_limit)
    return Curve(fpr, pro, area, g.n_pos, g.n_neg, x_limit=fpr_limit, exact=keep is None)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def roc_curve(scores: ArrayLike, labels: ArrayLike, max_points: int | None = None) -> Curve | None:
    """Exact ROC curve (area = :func:`kdad.metrics.image_auroc`); any shapes, flattened, so
    stacked maps/masks give the pixel ROC. None without positives or negatives."""
    return _roc(positive_groups(*_image_inputs(scores, labels)), max_points, "roc_curve")


def precision_recall_curve(scores: ArrayLike, labels: ArrayLike, max_points: int | None = None) -> Curve | None:
    """Precision and recall at every threshold where recall changes (area = AP); any shapes,
    flattened. None without positives."""
    return _pr(positive_groups(*_image_inputs(scores, labels)), max_points, "precision_recall_curve")


def pro_curve(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3, max_points: int | None = None) -> Curve | None:
    """MVTec AD PRO curve up to ``fpr_limit`` (area / limit = :func:`kdad.metrics.aupro`).
    None when the masks have no region or no OK pixel."""
    data = pixel_data(maps, masks)
    return _pro(_pixel_groups(data, True), data.n_regions, fpr_limit, max_points)


def f1_max_threshold(scores: ArrayLike, labels: ArrayLike) -> float | None:
    """The threshold t (predict ``score >= t``) at which :func:`kdad.metrics.f1_max` is
    reached, the highest one if several tie; any shapes, flattened. None without positives."""
    return _f1_max_threshold(positive_groups(*_image_inputs(scores, labels)))


def evaluate_with_curves(
    scores: ArrayLike,
    labels: ArrayLike,
    maps: MapsLike | None,
    masks: MapsLike | None,
    fpr_limit: float = 0.3,
    legacy_pro: bool = True,
    max_points: int | None = MAX_POINTS,
) -> tuple[dict[str, float], MetricCurves]:
    """:func:`kdad.metrics.evaluate` plus its curves and F1-optimal thresholds, from the same
    sorts (no extra pass over the pixels)."""
    found: dict[str, object] = {}

    def collect(level: str, g: PositiveGroups, n_regions: int) -> None:
        found[f"{level}_roc"] = _roc(g, max_points, f"{level}_roc")
        found[f"{level}_pr"] = _pr(g, max_points, f"{level}_pr")
        found[f"{level}_f1_threshold"] = _f1_max_threshold(g)
        if level == "pixel":
            found["pro"] = _pro(g, n_regions, fpr_limit, max_points)

    metrics = evaluate(scores, labels, maps, masks, fpr_limit, legacy_pro, on_groups=collect)
    return metrics, MetricCurves(**found)  # type: ignore[arg-type]
