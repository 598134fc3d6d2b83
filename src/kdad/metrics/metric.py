"""``AnomalyMetrics``: the exact metric suite as a torchmetrics ``Metric``.

States accumulate on the metric's device with ``dist_reduce_fx="cat"``; ``compute`` runs the
functional suite (:func:`kdad.metrics.functional.evaluate`) once on everything gathered.

Maps are stored flattened (float32, the DESIGN's precision for anomaly maps; float64 maps stay
float64) together with their (H, W) shape, so that images of different sizes (native-resolution
evaluation) can be concatenated and gathered like any "cat" state. Masks are stored as bool.
torchmetrics' own binary AUROC/AP classes are deliberately not used: they pass scores outside
[0, 1] through a sigmoid, which merges distinct large scores (``specs/metrics.md``).

Memory: the states hold 4 bytes (map) + 1 byte (mask) per pixel on the device. ``compute``
concatenates them once (one more copy) and the suite adds a sorted copy of the scores and int32
region ids: about 1.2 GiB on top of the states for 1,700 maps of 256x256 (see
``experiments/metrics_speed``). Labelling of the masks runs on the CPU (scipy); the sort and
the reductions run on the states' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from kdad.metrics.curves import MetricCurves, evaluate_with_curves

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _per_image(x: TensorOrList, what: str) -> list[torch.Tensor]:
    """Split a [B,1,H,W] / [B,H,W] tensor or a list of [1,h,w] / [h,w] tensors into [h,w]."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3:
            raise ValueError(f"{what} must be [B,1,H,W] or [B,H,W], got {tuple(x.shape)}")
        return list(x.unbind(0))
    out: list[torch.Tensor] = []
    for i, t in enumerate(x):
        if t.ndim == 3 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 2:
            raise ValueError(f"{what}[{i}] must be [1,h,w] or [h,w], got {tuple(t.shape)}")
        out.append(t)
    return out


class AnomalyMetrics(Metric):
    """Image AUROC/AP/F1-max, pixel AUROC/AP/F1-max, AU-PRO and (optionally) the RD legacy PRO.

    ``update(scores[B], labels[B], maps, masks)``; ``compute()`` returns ``dict[str, float]``
    with the keys of :func:`kdad.metrics.evaluate`. With ``pixel=False`` only the image metrics
    are computed and ``maps``/``masks`` may be omitted. ``compute`` also sets ``curves``
    (:class:`kdad.metrics.curves.MetricCurves`: ROC/PR/PRO curves and the test-set F1-optimal
    thresholds, from the same sorts as the metrics); it stays until the next ``compute``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[torch.Tensor]
    labels: list[torch.Tensor]
    maps: list[torch.Tensor]
    masks: list[torch.Tensor]
    shapes: list[torch.Tensor]

    def __init__(
        self,
        fpr_limit: float = 0.3,
        legacy_pro: bool = True,
        pixel: bool = True,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.fpr_limit = float(fpr_limit)
        self.legacy_pro = bool(legacy_pro)
        self.pixel = bool(pixel)
        self.curves: MetricCurves | None = None
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        if self.pixel:
            self.add_state("maps", default=[], dist_reduce_fx="cat")  # flattened pixels
            self.add_state("masks", default=[], dist_reduce_fx="cat")  # flattened, bool
            self.add_state("shapes", default=[], dist_reduce_fx="cat")  # [B, 2] int64 (H, W)

    def update(  # type: ignore[override]
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        maps: TensorOrList | None = None,
        masks: TensorOrList | None = None,
    ) -> None:
        scores = scores.detach().reshape(-1)
        if not scores.is_floating_point():
            scores = scores.double()
        labels = labels.detach().reshape(-1)
        if scores.numel() != labels.numel():
            raise ValueError(f"scores ({scores.numel()}) and labels ({labels.numel()}) differ")
        self.scores.append(scores)
        self.labels.append(labels.to(torch.uint8) if labels.dtype == torch.bool else labels)
        if not self.pixel:
            return
        if maps is None or masks is None:
            raise ValueError("AnomalyMetrics(pixel=True).update needs maps and masks")
        map_list, mask_list = _per_image(maps, "maps"), _per_image(masks, "masks")
        if len(map_list) != scores.numel() or len(mask_list) != scores.numel():
            raise ValueError(f"got {scores.numel()} scores, {len(map_list)} maps and {len(mask_list)} masks")
        flat_maps, flat_masks, shapes = [], [], []
        for i, (m, g) in enumerate(zip(map_list, mask_list)):
            if m.shape != g.shape:
                raise ValueError(f"maps[{i}] {tuple(m.shape)} and masks[{i}] {tuple(g.shape)} differ")
            if m.dtype != torch.float64:
                m = m.float()
            flat_maps.append(m.detach().reshape(-1))
            flat_masks.append((g.detach() != 0).reshape(-1))
            shapes.append(m.shape)
        self.maps.append(torch.cat(flat_maps) if len(flat_maps) > 1 else flat_maps[0].clone())
        self.masks.append(torch.cat(flat_masks))
        self.shapes.append(torch.tensor(shapes, dtype=torch.int64, device=scores.device))

    def compute(self) -> dict[str, float]:  # type: ignore[override]
        scores = dim_zero_cat(self.scores)
        labels = dim_zero_cat(self.labels)
        if not self.pixel:
            metrics, self.curves = evaluate_with_curves(scores, labels, None, None, self.fpr_limit, legacy_pro=False)
            return metrics
        flat_maps = dim_zero_cat(self.maps)
        flat_masks = dim_zero_cat(self.masks)
        shapes = dim_zero_cat(self.shapes).reshape(-1, 2).tolist()
        if all(hw == shapes[0] for hw in shapes):
            h, w = shapes[0]
            maps: TensorOrList = flat_maps.reshape(-1, h, w)  # a view: no copy
            masks: TensorOrList = flat_masks.reshape(-1, h, w)
        else:
            sizes = [h * w for h, w in shapes]
            maps = [m.reshape(h, w) for m, (h, w) in zip(flat_maps.split(sizes), shapes)]
            masks = [g.reshape(h, w) for g, (h, w) in zip(flat_masks.split(sizes), shapes)]
        metrics, self.curves = evaluate_with_curves(
            scores, labels, maps, masks, self.fpr_limit, legacy_pro=self.legacy_pro
        )
        return metrics
