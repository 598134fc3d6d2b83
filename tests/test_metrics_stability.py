"""auroc_change_bound: no perturbation within the bound's premise moves AUROC further than it
says, it is attained where it must be, and it equals a brute-force pair count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from kdad.metrics import auroc_change_bound


def _pairs_within(scores: np.ndarray, labels: np.ndarray, width: float) -> float:
    """Slow reference: the share of (anomalous, normal) pairs at most ``width`` apart."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    close = sum(1 for p in pos for n in neg if abs(float(p) - float(n)) <= width)
    return close / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_equals_the_brute_force_pair_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # integer scores: exact differences, many ties and many pairs exactly 2d apart
    scores = rng.integers(0, 100, size=60).astype(np.float64)
    labels = (rng.random(60) < 0.4).astype(int)
    for d in (0.0, 0.5, 1.0, 5.0, 100.0):
        assert auroc_change_bound(scores, labels, d) == pytest.approx(_pairs_within(scores, labels, 2 * d), abs=1e-12)


@pytest.mark.parametrize("seed", range(10))
def test_no_perturbation_within_d_moves_auroc_further(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.normal(size=40), 1)
    labels = (rng.random(40) < 0.5).astype(int)
    labels[:2] = [0, 1]
    d = float(rng.choice([0.0, 0.02, 0.05, 0.2]))
    bound = auroc_change_bound(scores, labels, d)
    base = roc_auc_score(labels, scores)
    for _ in range(100):
        moved = scores + rng.uniform(-d, d, size=scores.shape) * rng.integers(0, 2, size=scores.shape)
        assert abs(roc_auc_score(labels, moved) - base) <= bound + 1e-12
    # the adversarial perturbation: anomalous scores down, normal ones up
    worst = np.where(labels == 1, scores - d, scores + d)
    assert abs(roc_auc_score(labels, worst) - base) <= bound + 1e-12


def test_a_flip_the_bound_predicts_happens() -> None:
    scores, labels = np.array([0.50, 0.51, 0.9, 0.1]), np.array([1, 0, 1, 0])
    assert auroc_change_bound(scores, labels, 0.004) == 0.0  # 0.01 apart: no pair within 0.008
    bound = auroc_change_bound(scores, labels, 0.006)
    assert bound == 0.25  # one pair of four within 0.012
    flipped = roc_auc_score(labels, [0.506, 0.504, 0.9, 0.1]) - roc_auc_score(labels, scores)
    assert flipped == pytest.approx(bound)


def test_inputs_and_edge_cases() -> None:
    maps = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, 0, 2:5, 2:5] = 255
    expected = _pairs_within(maps.double().numpy().ravel(), (masks.numpy().ravel() > 0).astype(int), 0.02)
    assert auroc_change_bound(maps, masks, 0.01) == pytest.approx(expected)
    assert auroc_change_bound(maps, masks, 10.0) == 1.0
    assert math.isnan(auroc_change_bound([0.1, 0.2], [0, 0], 0.1))
    with pytest.raises(ValueError, match="differ in length"):
        auroc_change_bound([0.1, 0.2], [0], 0.1)
    with pytest.raises(ValueError, match="max_change"):
        auroc_change_bound([0.1, 0.2], [0, 1], -1.0)
