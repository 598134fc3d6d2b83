"""AnomalyMetrics (torchmetrics Metric): batched accumulation == evaluate on everything."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.utilities.data import dim_zero_cat

from kdad.metrics import AnomalyMetrics, evaluate

TOL = 1e-6


def make_batch(seed: int, b: int = 3, h: int = 16, w: int = 16):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(b, 1, h, w)
    masks[0, 0, 3:7, 4:9] = 1.0
    if b > 2:
        masks[2, 0, 10:12, 2:14] = 1.0
    maps = torch.rand(b, 1, h, w, generator=g) * 3 + masks * 0.8  # anomaly maps in [0, 3.8]
    scores = maps.amax(dim=(1, 2, 3))
    labels = (masks.amax(dim=(1, 2, 3)) > 0).long()
    return scores, labels, maps, masks


def test_batched_updates_equal_evaluate_on_concatenation() -> None:
    metric = AnomalyMetrics()
    batches = [make_batch(s) for s in range(4)]
    for batch in batches:
        metric.update(*batch)
    result = metric.compute()
    scores, labels, maps, masks = (torch.cat(x) for x in zip(*batches))
    expected = evaluate(scores, labels, maps, masks)
    assert set(result) == set(expected) and "rd_legacy_pro" in result
    for key, value in expected.items():
        assert abs(result[key] - value) < TOL, key
    assert all(isinstance(v, float) for v in result.values())
    sk = roc_auc_score(masks.flatten().numpy(), maps.flatten().numpy())
    assert abs(result["pixel_auroc"] - sk) < TOL


def test_states_are_cat_reduced_lists_and_reset() -> None:
    metric = AnomalyMetrics(fpr_limit=0.1, legacy_pro=False)
    for name in ("scores", "labels", "maps", "masks", "shapes"):
        assert metric._reductions[name] is dim_zero_cat
    metric.update(*make_batch(0))
    assert metric.masks[0].dtype == torch.bool
    assert metric.maps[0].dtype == torch.float32
    first = metric.compute()
    assert "rd_legacy_pro" not in first
    metric.reset()
    assert metric.maps == []
    metric.update(*make_batch(0))
    again = metric.compute()
    assert all(abs(again[k] - first[k]) < TOL for k in first)


def test_lists_of_different_sizes() -> None:
    """Native-resolution evaluation: each image its own size, [1,h,w] and [h,w] tensors."""
    g = torch.Generator().manual_seed(0)
    shapes = [(12, 20), (16, 16), (9, 31), (20, 11)]
    maps, masks = [], []
    for i, (h, w) in enumerate(shapes):
        mask = torch.zeros(1, h, w)
        if i % 2 == 0:
            mask[0, 2:6, 3:8] = 255.0  # 0/255 masks
        maps.append(torch.rand(1, h, w, generator=g) + mask / 255 * 0.5)
        masks.append(mask)
    scores = torch.stack([m.max() for m in maps])
    labels = torch.tensor([1, 0, 1, 0])
    metric = AnomalyMetrics()
    metric.update(scores[:2], labels[:2], maps[:2], masks[:2])
    metric.update(scores[2:], labels[2:], [m[0] for m in maps[2:]], [m[0] for m in masks[2:]])
    result = metric.compute()
    expected = evaluate(scores, labels, maps, masks)
    for key, value in expected.items():
        assert abs(result[key] - value) < TOL, key
    pooled_y = torch.cat([m.flatten() for m in masks]).numpy() > 0
    pooled_s = torch.cat([m.flatten() for m in maps]).numpy()
    assert abs(result["pixel_auroc"] - roc_auc_score(pooled_y, pooled_s)) < TOL


def test_image_only_mode() -> None:
    metric = AnomalyMetrics(pixel=False)
    rng = np.random.default_rng(0)
    s = rng.normal(size=40) + 20.0  # outside [0, 1]: no sigmoid may be applied
    y = rng.random(40) < 0.5
    metric.update(torch.tensor(s[:25]), torch.tensor(y[:25]))
    metric.update(torch.tensor(s[25:]), torch.tensor(y[25:]))
    result = metric.compute()
    assert set(result) == {"image_auroc", "image_ap", "image_f1_max"}
    assert abs(result["image_auroc"] - roc_auc_score(y, s)) < TOL


def test_update_rejects_mismatched_inputs() -> None:
    scores, labels, maps, masks = make_batch(0)
    metric = AnomalyMetrics()
    with pytest.raises(ValueError):
        metric.update(scores, labels, maps[:2], masks[:2])
    with pytest.raises(ValueError):
        metric.update(scores, labels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_states_stay_on_the_device() -> None:
    metric = AnomalyMetrics().to("cuda")
    batches = [make_batch(s) for s in range(2)]
    for batch in batches:
        metric.update(*(t.cuda() for t in batch))
    assert metric.maps[0].device.type == "cuda"
    result = metric.compute()
    expected = evaluate(*(torch.cat(x) for x in zip(*batches)))
    for key, value in expected.items():
        assert abs(result[key] - value) < TOL, key
