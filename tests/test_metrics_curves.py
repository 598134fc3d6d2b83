"""The curves behind the metrics and the F1-optimal thresholds, against scikit-learn, a
brute-force threshold loop and the slow PRO reference of test_metrics_aupro."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sklearn.metrics
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from kdad.metrics import (
    AnomalyMetrics,
    aupro,
    evaluate,
    evaluate_with_curves,
    f1_max,
    f1_max_threshold,
    image_ap,
    image_auroc,
    precision_recall_curve,
    pro_curve,
    roc_curve,
)
from kdad.metrics.curves import MAX_POINTS, TEST_SET_THRESHOLDS_LABEL
from test_metrics_aupro import reference_pro_curve

TOL = 1e-12


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def step_area(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the step curve drawn from the PR points: precision held from the previous recall."""
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def brute_force_f1_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Every distinct score t (descending), predict ``score >= t``; the best F1 and its highest t."""
    labels = labels.astype(bool)
    best, best_t = -1.0, float("nan")
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = int(np.sum(pred & labels))
        fp = int(np.sum(pred & ~labels))
        fn = int(np.sum(~pred & labels))
        f1 = 2 * tp / (2 * tp + fp + fn)
        if f1 > best:
            best, best_t = f1, float(t)
    return best, best_t


def random_case(seed: int, n: int, decimals: int | None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.normal(size=n) + 0.9 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)  # ties within and across classes
    return scores, labels


def pixel_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Five 12x14 maps (two without defects) with tied values and 8-connected regions."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((5, 12, 14), dtype=np.uint8)
    masks[0, 2:5, 3:7] = 1
    masks[0, 8:10, 10:13] = 1
    masks[2, 4:9, 1:3] = 1
    masks[3, 1:3, 1:3] = 1
    masks[3, 3, 3] = 1  # touches the square diagonally: one region with 8-connectivity
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2).astype(np.float32)
    return maps, masks


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_roc_curve_area_is_sklearn_auroc_and_its_points_are_sklearn_points(seed: int, decimals: int | None) -> None:
    scores, labels = random_case(seed, 157, decimals)
    curve = roc_curve(scores, labels)
    assert curve is not None and curve.exact
    assert abs(trapezoid(curve.x, curve.y) - roc_auc_score(labels, scores)) < TOL
    assert curve.area == image_auroc(scores, labels)
    assert (curve.x[0], curve.y[0], curve.x[-1], curve.y[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(curve.x) >= 0) and np.all(np.diff(curve.y) >= 0)
    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)
    reference = {(round(a, 12), round(b, 12)) for a, b in zip(fpr, tpr)}
    assert all((round(a, 12), round(b, 12)) in reference for a, b in zip(curve.x, curve.y))
    assert (curve.n_pos, curve.n_neg) == (int(labels.sum()), int((~labels).sum()))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
def test_pr_curve_is_sklearn_precision_recall_at_every_positive_score(seed: int, decimals: int | None) -> None:
    scores, labels = random_case(seed, 157, decimals)
    curve = precision_recall_curve(scores, labels)
    assert curve is not None
    precision, recall, thresholds = sklearn.metrics.precision_recall_curve(labels, scores)
    # our points: one per distinct score of a positive sample, highest first (recall increasing)
    at = np.searchsorted(thresholds, np.unique(scores[labels])[::-1])
    np.testing.assert_allclose(curve.x, recall[at], rtol=0, atol=TOL)
    np.testing.assert_allclose(curve.y, precision[at], rtol=0, atol=TOL)
    assert abs(step_area(curve.x, curve.y) - average_precision_score(labels, scores)) < TOL
    assert curve.area == image_ap(scores, labels)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_f1_threshold_is_where_f1_max_is_reached(seed: int, decimals: int | None) -> None:
    scores, labels = random_case(seed, 97, decimals)
    best, best_t = brute_force_f1_threshold(scores, labels)
    assert f1_max_threshold(scores, labels) == best_t
    assert f1_max(scores, labels) == pytest.approx(best, abs=TOL)


def test_f1_threshold_takes_the_highest_of_tied_maxima() -> None:
    # t=4: tp 1, fp 0, fn 1 -> F1 2/3; t=3: 1/2; t=2: 2/5; t=1: tp 2, fp 2, fn 0 -> 4/6 = 2/3
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    labels = np.array([1, 0, 0, 1])
    assert f1_max(scores, labels) == pytest.approx(2 / 3)
    assert f1_max_threshold(scores, labels) == 4.0
    assert brute_force_f1_threshold(scores, labels)[1] == 4.0


@pytest.mark.parametrize("seed", range(3))
def test_pixel_curves_and_threshold_from_evaluate_with_curves(seed: int) -> None:
    maps, masks = pixel_case(seed)
    scores = maps.max(axis=(1, 2))
    labels = masks.reshape(len(masks), -1).max(axis=1) > 0
    metrics, curves = evaluate_with_curves(scores, labels, maps, masks, fpr_limit=0.3)
    assert metrics == evaluate(scores, labels, maps, masks, fpr_limit=0.3)
    y, s = masks.ravel() > 0, maps.ravel()
    assert curves.pixel_roc is not None and curves.pixel_pr is not None and curves.pro is not None
    assert curves.pixel_roc.area == metrics["pixel_auroc"]
    assert abs(trapezoid(curves.pixel_roc.x, curves.pixel_roc.y) - roc_auc_score(y, s)) < TOL
    assert curves.pixel_pr.area == metrics["pixel_ap"]
    assert abs(step_area(curves.pixel_pr.x, curves.pixel_pr.y) - average_precision_score(y, s)) < TOL
    assert curves.pixel_f1_threshold == brute_force_f1_threshold(s, y)[1]
    assert curves.image_f1_threshold == brute_force_f1_threshold(scores, labels)[1]
    assert curves.image_roc is not None and curves.image_roc.area == metrics["image_auroc"]
    assert curves.pro.area == metrics["aupro"]


@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_pro_curve_area_is_aupro_and_its_points_are_the_reference_points(limit: float) -> None:
    maps, masks = pixel_case(7)
    curve = pro_curve(maps, masks, fpr_limit=limit)
    assert curve is not None and curve.x_limit == limit
    assert curve.x[-1] == pytest.approx(limit) and np.all(curve.x <= limit)
    assert abs(trapezoid(curve.x, curve.y) / limit - aupro(maps, masks, fpr_limit=limit)) < TOL
    assert curve.area == aupro(maps, masks, fpr_limit=limit)
    fprs, pros = reference_pro_curve(list(maps), list(masks))
    reference = {(round(a, 12), round(b, 12)) for a, b in zip(fprs, pros)}
    inner = zip(curve.x[:-1], curve.y[:-1]) if limit < 1.0 else zip(curve.x, curve.y)  # last: interpolated
    assert all((round(a, 12), round(b, 12)) in reference for a, b in inner)


def test_thinned_curves_are_bounded_and_keep_the_exact_areas() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((12, 96, 96)).astype(np.float32)  # ~110k distinct values
    masks = np.zeros(maps.shape, dtype=bool)
    masks[::2, 20:60, 30:70] = True
    maps += 0.3 * masks
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
    metrics, curves = evaluate_with_curves(scores, labels, maps, masks, legacy_pro=False)
    for name, curve in (("pixel_roc", curves.pixel_roc), ("pro", curves.pro)):
        assert curve is not None and not curve.exact and len(curve.x) <= 2 * MAX_POINTS + 3, name
    assert curves.pixel_pr is not None and len(curves.pixel_pr.x) <= MAX_POINTS
    assert curves.pixel_roc.area == metrics["pixel_auroc"] and curves.pro.area == metrics["aupro"]
    assert curves.pixel_pr.area == metrics["pixel_ap"]
    # the thinned drawing stays close to the exact curve
    assert abs(trapezoid(curves.pixel_roc.x, curves.pixel_roc.y) - metrics["pixel_auroc"]) < 1e-3
    assert abs(trapezoid(curves.pro.x, curves.pro.y) / 0.3 - metrics["aupro"]) < 1e-3
    assert curves.pixel_pr.x[-1] == 1.0 and (curves.pixel_roc.x[-1], curves.pixel_roc.y[-1]) == (1.0, 1.0)
    small = roc_curve(maps, masks, max_points=50)
    assert small is not None and len(small.x) <= 2 * 50 + 2 and np.all(np.diff(small.x) >= 0)


def test_anomaly_metrics_keeps_curves_from_its_compute() -> None:
    maps, masks = pixel_case(1)
    scores = torch.from_numpy(maps.max(axis=(1, 2)))
    labels = torch.from_numpy((masks.reshape(5, -1).max(axis=1) > 0).astype(np.int64))
    metric = AnomalyMetrics()
    metric.update(scores, labels, torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None])
    out = metric.compute()
    curves = metric.curves
    assert curves is not None and curves.pixel_roc is not None and curves.pro is not None
    assert curves.pixel_roc.area == out["pixel_auroc"] and curves.pro.area == out["aupro"]
    assert curves.image_f1_threshold == brute_force_f1_threshold(scores.numpy(), labels.numpy())[1]
    section = curves.test_set_thresholds()
    assert section == {
        "label": TEST_SET_THRESHOLDS_LABEL,
        "image_f1_threshold": curves.image_f1_threshold,
        "pixel_f1_threshold": curves.pixel_f1_threshold,
    }
    assert section["label"].startswith("TEST-SET-DERIVED") and "not for deployment" in section["label"]
    image_only = AnomalyMetrics(pixel=False)
    image_only.update(scores, labels)
    image_only.compute()
    assert image_only.curves is not None and image_only.curves.image_roc is not None
    assert image_only.curves.pixel_roc is None and image_only.curves.pro is None
    assert image_only.curves.pixel_f1_threshold is None


def test_undefined_curves_are_none() -> None:
    scores = np.array([0.1, 0.5, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the metrics themselves are NaN
        _, curves = evaluate_with_curves(scores, np.zeros(3), None, None)
    assert curves.image_roc is None and curves.image_pr is None and curves.image_f1_threshold is None
    assert roc_curve(scores, np.ones(3)) is None  # no negatives: no ROC
    assert precision_recall_curve(scores, np.ones(3)) is not None
