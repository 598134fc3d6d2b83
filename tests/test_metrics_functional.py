"""Image/pixel AUROC, AP and F1-max against scikit-learn and brute force (specs/metrics.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from kdad.metrics import (
    evaluate,
    f1_max,
    image_ap,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    rd_legacy_pro,
)

TOL = 1e-6


def brute_force_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Loop over every distinct score t, predict `score >= t`, return the best F1."""
    labels = labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        f1 = 2 * tp / (2 * tp + fp + fn) if tp > 0 else 0.0
        best = max(best, f1)
    return best


def random_case(seed: int, n: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.35
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + 0.8 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # many ties, also across classes
    return scores, labels


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_image_metrics_match_sklearn_and_brute_force(seed: int, decimals: int | None) -> None:
    scores, labels = random_case(seed, 157, decimals)
    assert abs(image_auroc(scores, labels) - roc_auc_score(labels, scores)) < TOL
    assert abs(image_ap(scores, labels) - average_precision_score(labels, scores)) < TOL
    assert abs(f1_max(scores, labels) - brute_force_f1_max(scores, labels)) < TOL


def test_constant_scores() -> None:
    labels = np.array([0, 1, 0, 1, 1, 0, 0])
    scores = np.full(7, 3.25)
    assert abs(image_auroc(scores, labels) - 0.5) < TOL
    assert abs(image_ap(scores, labels) - average_precision_score(labels, scores)) < TOL
    assert abs(f1_max(scores, labels) - brute_force_f1_max(scores, labels)) < TOL


def test_shifted_scores_no_sigmoid() -> None:
    """Scores far outside [0, 1] must be ranked as they are (torchmetrics applies a sigmoid)."""
    scores, labels = random_case(3, 300, None)
    shifted = 20.0 + 0.01 * scores  # float32 sigmoid would map most of these to exactly 1.0
    expected = roc_auc_score(labels, shifted)
    assert expected > 0.65
    assert abs(image_auroc(shifted, labels) - expected) < TOL
    shifted32 = torch.tensor(shifted, dtype=torch.float32)
    expected32 = roc_auc_score(labels, shifted32.numpy())
    assert expected32 > 0.65
    assert abs(image_auroc(shifted32, labels) - expected32) < TOL
    assert abs(image_ap(shifted, labels) - average_precision_score(labels, shifted)) < TOL


def test_float64_near_equal_values_are_not_merged() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.5
    scores = 1.0 + 1e-12 * rng.permutation(200) + 1e-12 * 40 * labels  # equal in float32
    assert np.unique(scores.astype(np.float32)).size == 1
    expected = roc_auc_score(labels, scores)
    assert expected > 0.6
    assert abs(image_auroc(scores, labels) - expected) < TOL
    assert abs(image_auroc(torch.from_numpy(scores), labels) - expected) < TOL
    assert abs(image_ap(scores, labels) - average_precision_score(labels, scores)) < TOL
    assert abs(f1_max(scores, labels) - brute_force_f1_max(scores, labels)) < TOL


def test_negative_zero_ties_positive_zero() -> None:
    scores = np.array([-0.0, 0.0, 0.0, -0.0, 1.0, -1.0])
    labels = np.array([1, 0, 1, 0, 1, 0])
    assert abs(image_auroc(scores, labels) - roc_auc_score(labels, scores)) < TOL
    assert abs(image_ap(scores, labels) - average_precision_score(labels, scores)) < TOL
    assert abs(f1_max(scores, labels) - brute_force_f1_max(scores, labels)) < TOL


def test_torch_and_integer_inputs() -> None:
    scores, labels = random_case(1, 120, 1)
    expected = roc_auc_score(labels, scores)
    t_scores = torch.tensor(scores, dtype=torch.float64)
    assert abs(image_auroc(t_scores, torch.tensor(labels)) - expected) < TOL
    ints = (scores * 10).astype(np.int64)
    assert abs(image_auroc(ints, labels.astype(np.int64)) - roc_auc_score(labels, ints)) < TOL
    half = torch.tensor(scores, dtype=torch.float16)
    assert abs(image_auroc(half, labels) - roc_auc_score(labels, half.float().numpy())) < TOL
    assert isinstance(image_auroc(t_scores, labels), float)


def test_single_class_is_nan_with_warning() -> None:
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(image_auroc(np.arange(5.0), np.zeros(5)))
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(image_ap(np.arange(5.0), np.zeros(5)))
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert math.isnan(image_auroc(np.arange(5.0), np.ones(5)))


def test_nan_scores_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    maps = np.zeros((2, 4, 4), dtype=np.float32)
    maps[1, 2, 2] = np.nan
    masks = np.zeros((2, 4, 4))
    masks[0, 1, 1] = 1
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(maps, masks)
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(torch.from_numpy(maps), masks)
    with pytest.raises(ValueError, match="NaN"):
        rd_legacy_pro(maps[::-1].copy(), masks)


def pixel_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((6, 20, 24), dtype=np.uint8)
    masks[1, 2:7, 3:9] = 255
    masks[2, 10:12, 4:20] = 255
    masks[4, 15:19, 15:22] = 255
    maps = np.round(rng.random(masks.shape) + 0.4 * (masks > 0), 2) * 5 + 20  # ties, > 1
    return maps, masks


@pytest.mark.parametrize("seed", range(3))
def test_pixel_metrics_match_sklearn_on_pooled_pixels(seed: int) -> None:
    maps, masks = pixel_case(seed)
    y, s = (masks > 0).ravel(), maps.ravel()
    assert abs(pixel_auroc(maps, masks) - roc_auc_score(y, s)) < TOL
    assert abs(pixel_ap(maps, masks) - average_precision_score(y, s)) < TOL
    assert abs(pixel_f1_max(maps, masks) - brute_force_f1_max(s, y)) < TOL
    # [N,1,H,W] tensors (float32) give the same numbers as NumPy [N,H,W]
    t_maps = torch.tensor(maps, dtype=torch.float32)[:, None]
    t_masks = torch.tensor(masks)[:, None]
    s32 = t_maps.numpy().ravel()
    assert abs(pixel_auroc(t_maps, t_masks) - roc_auc_score(y, s32)) < TOL


def test_pixel_metrics_accept_lists_of_different_sizes() -> None:
    rng = np.random.default_rng(5)
    shapes = [(9, 13), (16, 11), (7, 7), (20, 5)]
    maps, masks = [], []
    for i, (h, w) in enumerate(shapes):
        g = np.zeros((h, w), dtype=np.float32)
        if i % 2 == 0:
            g[1:4, 2:5] = 1
        maps.append(rng.random((1, h, w)).astype(np.float32) + g * 0.3)
        masks.append(g[None])
    y = np.concatenate([m.ravel() for m in masks]) > 0
    s = np.concatenate([m.ravel() for m in maps])
    assert abs(pixel_auroc(maps, masks) - roc_auc_score(y, s)) < TOL
    t_maps = [torch.from_numpy(m) for m in maps]
    assert abs(pixel_ap(t_maps, masks) - average_precision_score(y, s)) < TOL


def test_evaluate_keys_and_values() -> None:
    maps, masks = pixel_case(0)
    scores = maps.max(axis=(1, 2))
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    out = evaluate(scores, labels, maps, masks)
    assert set(out) == {
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "aupro",
        "rd_legacy_pro",
    }
    assert all(isinstance(v, float) for v in out.values())
    assert abs(out["image_auroc"] - roc_auc_score(labels, scores)) < TOL
    assert abs(out["pixel_auroc"] - roc_auc_score(masks.ravel() > 0, maps.ravel())) < TOL
    assert abs(out["pixel_ap"] - average_precision_score(masks.ravel() > 0, maps.ravel())) < TOL
    assert "rd_legacy_pro" not in evaluate(scores, labels, maps, masks, legacy_pro=False)
    assert set(evaluate(scores, labels, None, None)) == {"image_auroc", "image_ap", "image_f1_max"}


def test_torch_sort_path_matches_numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA code path (torch.sort / torch.argsort) exercised on CPU tensors."""
    import kdad.metrics.functional as functional

    maps, masks = pixel_case(2)
    scores = maps.max(axis=(1, 2))
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    numpy_path = evaluate(scores, labels, maps, masks)
    monkeypatch.setattr(functional, "_sorted_copy", lambda s: torch.sort(s).values)
    monkeypatch.setattr(functional, "_argsort", torch.argsort)
    torch_path = evaluate(scores, labels, maps, masks)
    for key, value in numpy_path.items():
        assert abs(torch_path[key] - value) < TOL, key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_match_cpu() -> None:
    maps, masks = pixel_case(1)
    scores = maps.max(axis=(1, 2))
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    cpu = evaluate(scores, labels, maps, masks)
    gpu = evaluate(
        torch.tensor(scores, device="cuda"),
        torch.tensor(labels, device="cuda"),
        torch.tensor(maps, device="cuda"),
        torch.tensor(masks, device="cuda"),
    )
    for k, v in cpu.items():
        assert abs(gpu[k] - v) < TOL, k
