"""Exact anomaly-detection metrics: AUROC, AP, F1-max (image and pixel level) and AU-PRO.

Contract: ``specs/metrics.md``. Every distinct score is a threshold, tied scores form one
point, no binning. All pixel metrics of :func:`evaluate` come from **one** sort of the pooled
pixel scores.

How the curves are derived from one sort
----------------------------------------
Let ``s`` be the pooled scores sorted ascending (reading it backwards is the descending sort of
the specification). A ROC/PR/PRO point exists at the end of every tie group (all pixels with
score >= v, for each distinct value v). Between two tie groups that contain a positive pixel
the true-positive count and the PRO value are constant, so every curve is fully determined by
the groups that contain at least one positive (defect) pixel:

* the positive pixels alone are sorted (a much smaller sort) and grouped by value, giving per
  group the positive count ``pos_k`` and the sum of the region weights ``1/|region|``;
* ``start_k``/``end_k`` = ``searchsorted(s, v_k, 'left'/'right')`` give how many pixels lie
  strictly below / at-or-below ``v_k``; everything else follows from cumulative sums.

Then, with ``tp_k`` / ``fp_k`` the positives / negatives with score >= v_k (descending order):

* AUROC = sum_k pos_k (negatives strictly below + neg_k/2) / (P N)   (the trapezoid area of the
  exact ROC curve, i.e. Mann-Whitney with ties counted 1/2);
* AP    = sum_k (pos_k / P) * tp_k / (tp_k + fp_k)                     (scikit-learn's step-wise
  definition; groups without positives do not change recall and add nothing);
* F1max = max_k 2 tp_k / (tp_k + fp_k + P)                             (between positive groups
  tp is constant and the denominator grows, so the maximum sits at a positive group);
* PRO curve: the points just before and just after every positive group, (0, 0) in front and
  a horizontal tail to FPR = 1; the dropped points lie on horizontal segments, so the
  trapezoid area and the interpolation at the limit are those of the full curve (the ROC curve
  is built the same way with TPR in place of PRO).
* F1-optimal threshold: the score ``v_k`` of the group where F1max is reached (the highest one
  on ties). The curves and thresholds for plotting and reporting: :mod:`kdad.metrics.curves`.

Devices and precision
---------------------
Inputs may be NumPy arrays or torch tensors on any device. CPU data is sorted with NumPy
(SIMD sort, in place on a copy); CUDA tensors are sorted and reduced on the GPU with torch.
Connected-component labelling of the masks always runs on the CPU (``scipy.ndimage.label``);
masks are small (bool). float16/bfloat16 scores are widened to float32 (exact); float32 and
float64 keep their dtype (no float64 -> float32 cast, which could merge distinct scores).
Counts are int64, accumulations float64. NaN scores raise ``ValueError``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

ArrayLike = np.ndarray | torch.Tensor
MapsLike = ArrayLike | Sequence[ArrayLike]

__all__ = [
    "aupro",
    "evaluate",
    "f1_max",
    "image_ap",
    "image_auroc",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
]

#: 3x3 ones: 8-connectivity, as in the official MVTec AD evaluation code.
EIGHT_CONNECTIVITY = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _as_tensor(x: Any) -> torch.Tensor:
    """A detached tensor sharing memory with ``x`` where possible (NumPy arrays: zero-copy)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    arr = np.asarray(x)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))


def _as_scores(x: Any) -> torch.Tensor:
    """Scores as a floating tensor: half precision widened to float32, integers to float64."""
    t = _as_tensor(x)
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif not t.is_floating_point():
        t = t.to(torch.float64)
    return t  # NaN is detected after the sort (NaN sorts last), see positive_groups


def _as_labels(x: Any) -> torch.Tensor:
    """Binary labels as a bool tensor (any nonzero value is positive)."""
    return _as_tensor(x) != 0


def _image_inputs(scores: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    s = _as_scores(scores).reshape(-1)
    y = _as_labels(labels).reshape(-1).to(s.device)
    if s.numel() != y.numel():
        raise ValueError(f"scores ({s.numel()}) and labels ({y.numel()}) differ in length")
    return s, y


def _squeeze_channel(t: torch.Tensor, what: str, batched: bool) -> torch.Tensor:
    """[N,1,H,W] -> [N,H,W] (batched) or [1,H,W] -> [H,W] (single image)."""
    if batched:
        if t.ndim == 4 and t.shape[1] == 1:
            return t[:, 0]
        if t.ndim == 2:
            return t[None]
        if t.ndim == 3:
            return t
        raise ValueError(f"{what} must be [N,H,W] or [N,1,H,W], got shape {tuple(t.shape)}")
    if t.ndim == 3 and t.shape[0] == 1:
        return t[0]
    if t.ndim == 2:
        return t
    raise ValueError(f"each element of {what} must be [H,W] or [1,H,W], got {tuple(t.shape)}")


@dataclass
class PixelData:
    """Pooled pixel scores with the connected defect region of every pixel.

    ``scores``: 1-D float tensor (all pixels of all images). ``region``: 1-D int32 tensor on the
    same device, 0 for OK pixels and 1..n_regions for defect pixels (regions are numbered over
    all images). ``region_size[r]``: pixel count of region r (index 0 unused).
    ``image_slices``: (start, height, width) of every image inside the pooled vectors.
    """

    scores: torch.Tensor
    region: torch.Tensor
    n_regions: int
    region_size: torch.Tensor
    image_slices: list[tuple[int, int, int]]


def _label_regions(mask_stack: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a [N,H,W] bool stack, labelled per image with unique ids.

    A 3x3x3 structure whose only nonzero plane is the middle one connects pixels within an
    image (8-connectivity) and never across images, so one ``ndimage.label`` call labels the
    whole stack with ids that are already distinct over images.
    """
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = EIGHT_CONNECTIVITY
    labels, n = ndimage.label(mask_stack, structure=structure)
    return labels, int(n)


def pixel_data(maps: MapsLike, masks: MapsLike) -> PixelData:
    """Pool maps/masks: a [N,H,W] / [N,1,H,W] array, or lists of [H,W] / [1,H,W] of any sizes."""
    if isinstance(maps, (list, tuple)):
        if not isinstance(masks, (list, tuple)) or len(masks) != len(maps):
            raise ValueError("maps is a list: masks must be a list of the same length")
        if len(maps) == 0:
            raise ValueError("maps is empty")
        score_parts: list[torch.Tensor] = []
        region_parts: list[np.ndarray] = []
        slices: list[tuple[int, int, int]] = []
        offset = 0
        n_regions = 0
        for i, (m, g) in enumerate(zip(maps, masks)):
            mt = _squeeze_channel(_as_scores(m), f"maps[{i}]", batched=False)
            gt = _squeeze_channel(_as_labels(g), f"masks[{i}]", batched=False)
            if mt.shape != gt.shape:
                raise ValueError(f"maps[{i}] {tuple(mt.shape)} and masks[{i}] {tuple(gt.shape)} differ")
            lab, n = ndimage.label(gt.cpu().numpy(), structure=EIGHT_CONNECTIVITY)
            lab = lab.astype(np.int32, copy=False)
            lab[lab > 0] += n_regions
            n_regions += int(n)
            region_parts.append(lab.reshape(-1))
            score_parts.append(mt.reshape(-1))
            slices.append((offset, int(mt.shape[0]), int(mt.shape[1])))
            offset += mt.numel()
        dtypes = {p.dtype for p in score_parts}
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        device = score_parts[0].device
        scores = torch.cat([p.to(device=device, dtype=dtype) for p in score_parts])
        region_np = np.concatenate(region_parts)
    else:
        mt = _squeeze_channel(_as_scores(maps), "maps", batched=True)
        gt = _squeeze_channel(_as_labels(masks), "masks", batched=True)
        if mt.shape != gt.shape:
            raise ValueError(f"maps {tuple(mt.shape)} and masks {tuple(gt.shape)} differ in shape")
        lab, n_regions = _label_regions(gt.cpu().numpy())
        region_np = lab.reshape(-1)
        scores = mt.reshape(-1)
        hw = int(mt.shape[1]) * int(mt.shape[2])
        slices = [(i * hw, int(mt.shape[1]), int(mt.shape[2])) for i in range(mt.shape[0])]
    region_np = region_np.astype(np.int32, copy=False)  # int32: half the memory of int64
    size = np.bincount(region_np[region_np != 0], minlength=n_regions + 1).astype(np.int64)
    region = torch.from_numpy(region_np).to(scores.device)
    return PixelData(scores, region, n_regions, torch.from_numpy(size), slices)


# --------------------------------------------------------------------------------------------
# the one sort
# --------------------------------------------------------------------------------------------
@dataclass
class PositiveGroups:
    """Per tie group that holds >= 1 positive, in DESCENDING score order (float64/int64, CPU).

    ``n``: number of samples; ``n_pos``: number of positives.
    ``above``: samples with a score strictly above the group; ``size``: samples in the group;
    ``pos``: positives in the group; ``weight``: sum of the per-positive weights in the group;
    ``values``: the group's score (float64, exact for float32/float64 scores): the threshold
    ``score >= value`` at which the group's counts hold.
    """

    n: int
    n_pos: int
    above: np.ndarray
    size: np.ndarray
    pos: np.ndarray
    weight: np.ndarray | None
    values: np.ndarray

    @property
    def n_neg(self) -> int:
        return self.n - self.n_pos

    @property
    def tp(self) -> np.ndarray:
        """Positives with score >= the group's value."""
        return np.cumsum(self.pos)

    @property
    def fp(self) -> np.ndarray:
        """Negatives with score >= the group's value."""
        return self.above + self.size - self.tp


def _sorted_copy(scores: torch.Tensor) -> torch.Tensor:
    """Ascending sorted copy of a 1-D tensor: NumPy's SIMD sort on CPU, torch.sort on CUDA."""
    if scores.device.type == "cpu":
        arr = scores.numpy().copy()
        arr.sort()
        return torch.from_numpy(arr)
    return torch.sort(scores).values


def _argsort(scores: torch.Tensor) -> torch.Tensor:
    """Ascending argsort of a 1-D tensor: NumPy on CPU, torch on CUDA."""
    if scores.device.type == "cpu":
        return torch.from_numpy(np.argsort(scores.numpy()))
    return torch.argsort(scores)


def positive_groups(
    scores: torch.Tensor,
    positive: torch.Tensor,
    pos_weight: torch.Tensor | None = None,
) -> PositiveGroups:
    """The one sort of ``scores``: counts at every tie group containing a positive sample.

    ``positive``: bool mask (same shape as ``scores``). ``pos_weight``: optional float64 weight
    per POSITIVE sample (in the order of ``scores[positive]``), summed per group.
    """
    scores = scores.reshape(-1)
    positive = positive.reshape(-1).to(scores.device)
    n = scores.numel()
    sorted_all = _sorted_copy(scores)  # -0.0 and +0.0 compare equal: searchsorted ties them
    if n > 0 and bool(torch.isnan(sorted_all[-1])):  # NumPy and torch sort NaN last
        raise ValueError("scores contain NaN; the metrics are undefined for NaN scores")
    pos_scores = scores[positive] + 0.0  # + 0.0 maps -0.0 to +0.0 before grouping by value
    n_pos = pos_scores.numel()
    if n_pos == 0:
        empty = np.zeros(0, dtype=np.int64)
        no_values = np.zeros(0, dtype=np.float64)
        return PositiveGroups(n, 0, empty, empty, empty, None if pos_weight is None else empty, no_values)
    order = _argsort(pos_scores)
    pos_sorted = pos_scores[order]
    values, inverse, counts = torch.unique_consecutive(pos_sorted, return_inverse=True, return_counts=True)
    start = torch.searchsorted(sorted_all, values, right=False)
    end = torch.searchsorted(sorted_all, values, right=True)
    weight: np.ndarray | None = None
    if pos_weight is not None:
        w = pos_weight.to(device=scores.device, dtype=torch.float64)[order]
        wsum = torch.zeros(values.numel(), dtype=torch.float64, device=scores.device)
        wsum.index_add_(0, inverse, w)
        weight = wsum.cpu().numpy()[::-1].copy()

    def desc(t: torch.Tensor) -> np.ndarray:
        return t.to(torch.int64).cpu().numpy()[::-1].copy()

    start_np, end_np = desc(start), desc(end)
    return PositiveGroups(
        n=n,
        n_pos=n_pos,
        above=n - end_np,
        size=end_np - start_np,
        pos=desc(counts),
        weight=weight,
        values=values.to(torch.float64).cpu().numpy()[::-1].copy(),
    )


# --------------------------------------------------------------------------------------------
# metrics from the groups
# --------------------------------------------------------------------------------------------
def _undefined(name: str, why: str) -> float:
    warnings.warn(f"{name} is undefined: {why}; returning NaN", RuntimeWarning, stacklevel=3)
    return math.nan


def _auroc(g: PositiveGroups, name: str) -> float:
    if g.n_pos == 0 or g.n_neg == 0:
        return _undefined(name, "needs both positive and negative samples")
    fp = g.fp.astype(np.float64)
    neg_in_group = (g.size - g.pos).astype(np.float64)
    neg_below = g.n_neg - fp
    return float(np.sum(g.pos / g.n_pos * (neg_below + 0.5 * neg_in_group)) / g.n_neg)


def _ap(g: PositiveGroups, name: str) -> float:
    if g.n_pos == 0:
        return _undefined(name, "there is no positive sample")
    predicted = (g.above + g.size).astype(np.float64)
    precision = g.tp / predicted
    return float(np.sum(g.pos / g.n_pos * precision))


def _f1_scores(g: PositiveGroups) -> np.ndarray:
    """F1 of the prediction ``score >= value`` at every positive group (descending values)."""
    predicted = (g.above + g.size).astype(np.float64)
    return 2.0 * g.tp / (predicted + g.n_pos)


def _f1_max(g: PositiveGroups, name: str) -> float:
    if g.n_pos == 0:
        return _undefined(name, "there is no positive sample")
    return float(np.max(_f1_scores(g)))


def _f1_max_threshold(g: PositiveGroups) -> float | None:
    """The threshold at which :func:`_f1_max` is reached (``score >= threshold`` = positive);
    the highest such threshold when several reach the maximum; None without positives."""
    if g.n_pos == 0:
        return None
    return float(g.values[int(np.argmax(_f1_scores(g)))])


def _clip_to(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve (x nondecreasing, x[0] = 0) cut at x = ``limit``.

    As in the official MVTec AD ``trapezoid``: the points with x <= limit, plus (limit, y*)
    with y* linearly interpolated between the last point at or below the limit and the next one.
    """
    m = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    xs, ys = x[:m], y[:m]
    if m < len(x) and xs[-1] < limit:
        x0, x1, y0, y1 = x[m - 1], x[m], y[m - 1], y[m]
        y_star = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, limit), np.append(ys, y_star)
    return xs, ys


def _trapezoid_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of the curve (x nondecreasing, x[0] = 0) from 0 to ``limit``."""
    xs, ys = _clip_to(x, y, limit)
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))


def _staircase(
    g: PositiveGroups, y_after: np.ndarray, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, y) points: (0,0), before/after every positive group, horizontal tail to FPR 1.

    ``y_after[k]``: the curve's y once group k is counted (TPR for the ROC, PRO for the PRO
    curve); y is constant between positive groups, so these points carry the whole curve.
    ``groups``: optional increasing subset of group indices to draw (the tail keeps the last
    group's y); by default every group, which gives the exact curve.
    """
    tp = g.tp
    fp_after = g.fp
    fp_before = g.above - (tp - g.pos)
    y_before = np.concatenate(([0.0], y_after[:-1]))
    y_last = y_after[-1]
    if groups is not None:
        fp_after, fp_before = fp_after[groups], fp_before[groups]
        y_after, y_before = y_after[groups], y_before[groups]
    k = len(fp_after)
    fpr = np.empty(2 * k + 2)
    y = np.empty(2 * k + 2)
    fpr[0], y[0] = 0.0, 0.0
    fpr[1:-1:2], y[1:-1:2] = fp_before / g.n_neg, y_before
    fpr[2:-1:2], y[2:-1:2] = fp_after / g.n_neg, y_after
    fpr[-1], y[-1] = 1.0, y_last
    return fpr, y


def _pro_values(g: PositiveGroups, n_regions: int) -> np.ndarray:
    """PRO once each positive group is counted (clipped at 1 as in the official code)."""
    assert g.weight is not None
    return np.minimum(np.cumsum(g.weight) / n_regions, 1.0)


def _pro_curve(g: PositiveGroups, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points: (0,0), before/after every positive group, horizontal tail to FPR 1."""
    return _staircase(g, _pro_values(g, n_regions))


def _aupro(g: PositiveGroups, n_regions: int, fpr_limit: float) -> float:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if n_regions == 0:
        return _undefined("aupro", "the masks contain no defect region")
    if g.n_neg == 0:
        return _undefined("aupro", "there is no defect-free (OK) pixel")
    fpr, pro = _pro_curve(g, n_regions)
    return float(_trapezoid_to(fpr, pro, fpr_limit) / fpr_limit)


def _pixel_groups(data: PixelData, with_weights: bool) -> PositiveGroups:
    positive = data.region > 0
    weight = None
    if with_weights:
        inv = torch.zeros(data.n_regions + 1, dtype=torch.float64)
        inv[1:] = 1.0 / data.region_size[1:].to(torch.float64)
        weight = inv.to(data.scores.device)[data.region[positive].long()]
    return positive_groups(data.scores, positive, weight)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def image_auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """ROC AUC of image scores vs labels (exact, ties count 1/2); NaN + warning if one class."""
    return _auroc(positive_groups(*_image_inputs(scores, labels)), "image_auroc")


def image_ap(scores: ArrayLike, labels: ArrayLike) -> float:
    """Step-wise average precision sum_n (R_n - R_{n-1}) P_n (scikit-learn's definition)."""
    return _ap(positive_groups(*_image_inputs(scores, labels)), "image_ap")


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum over all thresholds (every distinct score) of 2PR/(P+R)."""
    return _f1_max(positive_groups(*_image_inputs(scores, labels)), "f1_max")


def pixel_auroc(maps: MapsLike, masks: MapsLike) -> float:
    """ROC AUC over all pooled pixels (defect-free images included); nonzero mask = defect."""
    data = pixel_data(maps, masks)
    return _auroc(_pixel_groups(data, False), "pixel_auroc")


def pixel_ap(maps: MapsLike, masks: MapsLike) -> float:
    """Step-wise average precision over all pooled pixels."""
    data = pixel_data(maps, masks)
    return _ap(_pixel_groups(data, False), "pixel_ap")


def pixel_f1_max(maps: MapsLike, masks: MapsLike) -> float:
    """Maximum F1 over all thresholds over all pooled pixels."""
    data = pixel_data(maps, masks)
    return _f1_max(_pixel_groups(data, False), "pixel_f1_max")


def aupro(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> float:
    """MVTec AD AU-PRO up to ``fpr_limit``, divided by it (``specs/metrics.md``).

    8-connected regions of each mask (pooled over images, each region counts once); one global
    per-pixel FPR over all OK pixels of all images (defect-free images included); every
    distinct score a threshold, the last point of each tie group kept, (0, 0) prepended;
    trapezoid up to the limit with linear interpolation at the limit. NaN + warning when there
    is no region or no OK pixel.
    """
    data = pixel_data(maps, masks)
    return _aupro(_pixel_groups(data, True), data.n_regions, fpr_limit)


#: ``evaluate``'s optional hook: called with ("image", groups, 0) and ("pixel", groups,
#: n_regions) right after the metrics of that level are computed from those groups.
GroupsHook = Callable[[str, PositiveGroups, int], None]


def _pixel_metrics(g: PositiveGroups, n_regions: int, fpr_limit: float) -> dict[str, float]:
    return {
        "pixel_auroc": _auroc(g, "pixel_auroc"),
        "pixel_ap": _ap(g, "pixel_ap"),
        "pixel_f1_max": _f1_max(g, "pixel_f1_max"),
        "aupro": _aupro(g, n_regions, fpr_limit),
    }


def _image_metrics(g: PositiveGroups) -> dict[str, float]:
    return {
        "image_auroc": _auroc(g, "image_auroc"),
        "image_ap": _ap(g, "image_ap"),
        "image_f1_max": _f1_max(g, "image_f1_max"),
    }


def pixel_metrics(data: PixelData, fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel AUROC / AP / F1-max and AU-PRO from one sort of the pooled pixel scores."""
    return _pixel_metrics(_pixel_groups(data, True), data.n_regions, fpr_limit)


def image_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """image AUROC / AP / F1-max from one sort of the image scores."""
    return _image_metrics(positive_groups(*_image_inputs(scores, labels)))


def evaluate(
    scores: ArrayLike,
    labels: ArrayLike,
    maps: MapsLike | None,
    masks: MapsLike | None,
    fpr_limit: float = 0.3,
    legacy_pro: bool = True,
    on_groups: GroupsHook | None = None,
) -> dict[str, float]:
    """The whole metric suite as a dict of Python floats.

    Keys: image_auroc, image_ap, image_f1_max, and (unless ``maps`` is None: image-only mode)
    pixel_auroc, pixel_ap, pixel_f1_max, aupro and, if ``legacy_pro``, rd_legacy_pro (the RD/URD
    per-image PRO, never reported as ``aupro``). ``labels`` are taken as given.
    ``on_groups`` sees the sorted counts behind the metrics (curves and thresholds from the
    same sort: :func:`kdad.metrics.curves.evaluate_with_curves`); they are freed afterwards.
    """
    g = positive_groups(*_image_inputs(scores, labels))
    out = _image_metrics(g)
    if on_groups is not None:
        on_groups("image", g, 0)
    if maps is None:
        return out
    if masks is None:
        raise ValueError("maps given without masks")
    data = pixel_data(maps, masks)
    g = _pixel_groups(data, True)
    out.update(_pixel_metrics(g, data.n_regions, fpr_limit))
    if on_groups is not None:
        on_groups("pixel", g, data.n_regions)
    del g  # the pixel groups can be large: free them before the legacy PRO
    if legacy_pro:
        from kdad.metrics.legacy import rd_legacy_pro_from_data

        out["rd_legacy_pro"] = rd_legacy_pro_from_data(data)
    return out
