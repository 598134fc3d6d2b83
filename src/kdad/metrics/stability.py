"""How far AUROC can move when every score moves a little.

Two computations of the same model on the same images (another batch size, channels-last
weights, other CPU kernels, bf16 autocast, an exported graph) give scores that differ by float
rounding. AUROC depends only on the order of (anomalous, normal) pairs, so it moves only
through pairs that change order. If every score moves by at most ``d``, a pair whose scores are
more than ``2 d`` apart keeps its order; a pair within ``2 d`` can change its contribution (1,
1/2 on a tie, 0) by at most 1. Hence, with ``P`` anomalous and ``N`` normal scores,

    |AUROC(s + e) - AUROC(s)| <= #{(p, n): |s_p - s_n| <= 2 d} / (P N)   for every |e_i| <= d,

which :func:`auroc_change_bound` computes exactly (two sorts and two binary searches). It holds
for image AUROC (scores, labels) and pixel AUROC (pooled map values, mask pixels) alike: a
tolerance derived from the measured difference of two forward passes, instead of a constant
that one machine's rounding happens to satisfy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["auroc_change_bound"]


def _flat(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def auroc_change_bound(scores: Any, labels: Any, max_change: float) -> float:
    """The largest change of AUROC(``scores``, ``labels``) when every score moves by at most
    ``max_change`` (an upper bound: see the module docstring). ``labels``: any nonzero value
    is anomalous. NumPy arrays or tensors of any shape (flattened); NaN when one class is
    missing, as AUROC is undefined then."""
    if not max_change >= 0:
        raise ValueError(f"max_change must be >= 0, got {max_change}")
    s, y = _flat(scores), _flat(labels) != 0
    if s.size != y.size:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in length")
    positives, negatives = np.sort(s[y]), np.sort(s[~y])
    if positives.size == 0 or negatives.size == 0:
        return float("nan")
    # 2 d, widened by a few float64 ulps of the scores so that rounding in p -/+ 2d never drops
    # a pair that lies exactly on the boundary
    width = 2.0 * float(max_change) + 4.0 * np.spacing(np.abs(s).max())
    low = np.searchsorted(negatives, positives - width, side="left")
    high = np.searchsorted(negatives, positives + width, side="right")
    return float((high - low).sum() / (positives.size * negatives.size))
