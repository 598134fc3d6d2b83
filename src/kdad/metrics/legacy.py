"""The RD / RD++ / URD "legacy" PRO (``specs/rd_urd.md`` §1.5), kept for like-for-like comparison.

The official ``compute_pro`` of those repositories is called once per anomalous image:

1. thresholds ``np.arange(min, max, (max - min) / 200)`` over *that image's* map;
2. a pixel is predicted defective when its score is ``> th`` (strict);
3. PRO(th) = mean over the image's 8-connected GT regions (skimage ``measure.label`` with its
   default full connectivity = 8 in 2-D) of (predicted pixels in region) / |region|;
   FPR(th) = predicted OK pixels / OK pixels *of that image*;
4. keep the points with FPR < 0.3, divide FPR by the largest kept FPR (not by 0.3), take the
   trapezoidal area (scikit-learn ``auc``);
5. average over anomalous images. Defect-free images never enter.

This is NOT the MVTec AD AU-PRO (:func:`kdad.metrics.aupro`) and must never be reported
under that name. Instead of binarising the map 200 times, each image's OK pixels and each
region's pixels are sorted once and counted with ``searchsorted`` (same strict ``>``
comparison, same threshold values and dtype, so the same numbers).
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from kdad.metrics.functional import MapsLike, PixelData, pixel_data

__all__ = ["rd_legacy_pro", "rd_legacy_pro_from_data"]

#: FPR cut of the RD code (strict ``<``).
LEGACY_FPR_LIMIT = 0.3


def _count_above(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of values strictly greater than each threshold."""
    return len(sorted_values) - np.searchsorted(sorted_values, thresholds, side="right")


def _image_pro(amap: np.ndarray, region: np.ndarray, num_thresholds: int, index: int) -> float:
    """The legacy PRO of one anomalous image (flattened map and region ids, 0 = OK pixel)."""
    min_th, max_th = amap.min(), amap.max()
    if np.isnan(max_th):
        raise ValueError(f"rd_legacy_pro: the anomaly map of image {index} contains NaN")
    delta = (max_th - min_th) / num_thresholds
    if not delta > 0:
        warnings.warn(
            f"rd_legacy_pro: image {index} has a constant anomaly map; its PRO is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    thresholds = np.arange(min_th, max_th, delta)
    ok = np.sort(amap[region == 0])
    if len(ok) == 0:
        warnings.warn(
            f"rd_legacy_pro: image {index} has no OK pixel; its PRO is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    fpr = _count_above(ok, thresholds) / len(ok)
    ids = np.unique(region[region > 0])
    overlaps = np.empty((len(ids), len(thresholds)))
    for j, r in enumerate(ids):
        pixels = np.sort(amap[region == r])
        overlaps[j] = _count_above(pixels, thresholds) / len(pixels)
    pro = overlaps.mean(axis=0)
    keep = fpr < LEGACY_FPR_LIMIT
    fpr, pro = fpr[keep], pro[keep]
    if len(fpr) < 2 or not fpr.max() > 0:
        warnings.warn(
            f"rd_legacy_pro: image {index} keeps fewer than 2 points (or only FPR 0) below "
            f"FPR {LEGACY_FPR_LIMIT}; its PRO is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
        return math.nan
    fpr = fpr / fpr.max()
    # sklearn.metrics.auc: FPR decreases as the threshold grows, so the area is -trapz(pro, fpr)
    return float(-np.sum(0.5 * (pro[1:] + pro[:-1]) * np.diff(fpr)))


def rd_legacy_pro_from_data(data: PixelData, num_thresholds: int = 200) -> float:
    """Legacy PRO from pooled pixel data (see module docstring); NaN + warning if undefined."""
    scores = data.scores.cpu().numpy()
    region = data.region.cpu().numpy()
    values: list[float] = []
    for i, (start, h, w) in enumerate(data.image_slices):
        reg = region[start : start + h * w]
        if not reg.any():
            continue  # defect-free images never enter the legacy PRO
        values.append(_image_pro(scores[start : start + h * w], reg, num_thresholds, i))
    if not values:
        warnings.warn(
            "rd_legacy_pro is undefined: no anomalous image; returning NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return math.nan
    return float(np.mean(values))


def rd_legacy_pro(maps: MapsLike, masks: MapsLike, num_thresholds: int = 200) -> float:
    """The RD/URD official per-anomalous-image PRO (``specs/rd_urd.md`` §1.5).

    ``maps``/``masks`` as for :func:`kdad.metrics.aupro` ([N,H,W], [N,1,H,W] or lists);
    any nonzero mask value is a defect (the RD protocol binarises resized masks at 0.5 before).
    """
    return rd_legacy_pro_from_data(pixel_data(maps, masks), num_thresholds)
