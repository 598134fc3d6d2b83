"""AU-PRO (MVTec AD definition) and the RD legacy PRO against slow, obviously-correct references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import auc

from kdad.metrics import aupro, evaluate, rd_legacy_pro

TOL = 1e-6
EIGHT = np.ones((3, 3), dtype=int)
FOUR = ndimage.generate_binary_structure(2, 1)


# ------------------------------------------------------------------------------------------
# slow references
# ------------------------------------------------------------------------------------------
def reference_pro_curve(
    maps: list[np.ndarray], masks: list[np.ndarray], structure: np.ndarray = EIGHT
) -> tuple[list[float], list[float]]:
    """Every distinct threshold t (descending): global FPR over all OK pixels, mean overlap."""
    regions = []  # (image index, bool region mask)
    for i, g in enumerate(masks):
        lab, n = ndimage.label(g != 0, structure=structure)
        regions += [(i, lab == r) for r in range(1, n + 1)]
    n_ok = sum(int(np.sum(g == 0)) for g in masks)
    fprs, pros = [0.0], [0.0]
    for t in sorted(set(np.concatenate([m.ravel() for m in maps]).tolist()), reverse=True):
        fp = sum(int(np.sum((m >= t) & (g == 0))) for m, g in zip(maps, masks))
        overlaps = [np.sum(maps[i][r] >= t) / np.sum(r) for i, r in regions]
        fprs.append(fp / n_ok)
        pros.append(float(np.mean(overlaps)))
    return fprs, pros


def reference_area(fprs: list[float], pros: list[float], limit: float) -> float:
    """Walk the segments; clip the one that crosses the limit by linear interpolation."""
    area = 0.0
    for (x0, y0), (x1, y1) in zip(zip(fprs, pros), zip(fprs[1:], pros[1:])):
        if x0 >= limit:
            break
        if x1 > limit:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_lim) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def reference_aupro(maps, masks, limit: float = 0.3, structure: np.ndarray = EIGHT) -> float:
    maps = [np.asarray(m) for m in maps]
    masks = [np.asarray(g) for g in masks]
    return reference_area(*reference_pro_curve(maps, masks, structure), limit)


def reference_rd_legacy_pro(maps, masks, num_th: int = 200) -> float:
    """Straight from specs/rd_urd.md §1.5: binarise each anomalous image 200 times."""
    values = []
    for amap, mask in zip(maps, masks):
        mask = (np.asarray(mask) != 0).astype(int)
        if mask.sum() == 0:
            continue
        lab, n = ndimage.label(mask, structure=EIGHT)
        min_th, max_th = amap.min(), amap.max()
        delta = (max_th - min_th) / num_th
        rows = []
        for th in np.arange(min_th, max_th, delta):
            binary = amap > th
            pros = [binary[lab == r].sum() / (lab == r).sum() for r in range(1, n + 1)]
            inverse = 1 - mask
            fpr = np.logical_and(inverse, binary).sum() / inverse.sum()
            rows.append((np.mean(pros), fpr))
        pro = np.array([r[0] for r in rows])
        fpr = np.array([r[1] for r in rows])
        keep = fpr < 0.3
        values.append(auc(fpr[keep] / fpr[keep].max(), pro[keep]))
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------
# hand-computed cases
# ------------------------------------------------------------------------------------------
def hand_case_one_region() -> tuple[np.ndarray, np.ndarray]:
    """4x4, one 2x2 region (top-left) scored 0.9 0.8 0.4 0.3; OK pixels 0.7 0.6 0.5 and 9 x 0.1.

    Curve: (0,0) (0,.25) (0,.5) (1/12,.5) (2/12,.5) (3/12,.5) (3/12,.75) (3/12,1) (1,1).
    Area to 0.3: 0.25*0.5 + 0.05*1 = 0.175 -> /0.3 = 7/12. To 0.2: 0.2*0.5 -> /0.2 = 0.5.
    """
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 1
    amap = np.full((4, 4), 0.1)
    amap[0, 0], amap[0, 1], amap[1, 0], amap[1, 1] = 0.9, 0.8, 0.4, 0.3
    amap[3, 3], amap[3, 2], amap[3, 1] = 0.7, 0.6, 0.5
    return amap[None], mask[None]


def test_hand_computed_one_region() -> None:
    maps, masks = hand_case_one_region()
    assert abs(aupro(maps, masks) - 7 / 12) < TOL
    assert abs(aupro(maps, masks, fpr_limit=0.2) - 0.5) < TOL
    assert abs(reference_aupro(maps, masks) - 7 / 12) < TOL  # the reference agrees with paper


def test_hand_computed_interpolation_inside_a_tie_group() -> None:
    """Region 0.9 + 3 x 0.2; OK 6 x 0.2 + 6 x 0.1. Curve (0,0) (0,.25) (.5,1) (1,1).

    At FPR 0.3 the segment (0,.25)-(.5,1) gives .25 + .75*.6 = .7; area .3*(.25+.7)/2 = .1425.
    """
    mask = np.zeros((4, 4), dtype=np.uint8)
    mask[:2, :2] = 1
    amap = np.full((4, 4), 0.1)
    amap[mask == 1] = 0.2
    amap[0, 0] = 0.9
    amap[2, :] = 0.2
    amap[3, :2] = 0.2
    assert abs(aupro(amap[None], mask[None]) - 0.1425 / 0.3) < TOL


def test_eight_connectivity_diagonal_pixels_form_one_region() -> None:
    """(0,0) touches the bar (1,1..3) only diagonally: one region of 4 px with 8-connectivity.

    Only (0,0) scores above the OK pixels: PRO = 1/4 (8-conn) instead of (1+0)/2 (4-conn).
    """
    mask = np.zeros((1, 4, 4), dtype=np.uint8)
    mask[0, 0, 0] = 1
    mask[0, 1, 1:4] = 1
    amap = np.full((1, 4, 4), 0.5)
    amap[mask == 1] = 0.1
    amap[0, 0, 0] = 0.9
    assert abs(aupro(amap, mask) - 0.25) < TOL
    assert abs(reference_aupro(amap, mask, structure=FOUR) - 0.5) < TOL  # what 4-conn gives


def test_long_thin_diagonal_scratch_is_one_region() -> None:
    """A 1-px diagonal scratch of 50 px plus a 3x3 block: 2 regions (4-conn would give 51)."""
    mask = np.zeros((1, 64, 64), dtype=np.uint8)
    idx = np.arange(50)
    mask[0, idx, idx] = 1
    mask[0, 55:58, 5:8] = 1
    amap = np.full((1, 64, 64), 0.5)
    amap[0, idx, idx] = 1.0  # scratch fully found
    amap[0, 55:58, 5:8] = 0.0  # block missed
    assert abs(aupro(amap, mask) - 0.5) < TOL
    assert reference_aupro(amap, mask, structure=FOUR) > 0.9


def test_defect_free_images_enter_the_fpr() -> None:
    """Adding a defect-free image scored 0.75 everywhere: 16 more OK pixels above 0.5.

    Curve: (0,.25) (0,.5) then (16/28,.5): the limit 0.3 falls on PRO = .5 -> AU-PRO = 0.5.
    """
    maps, masks = hand_case_one_region()
    good_map = np.full((1, 4, 4), 0.75)
    good_mask = np.zeros((1, 4, 4), dtype=np.uint8)
    both_maps = np.concatenate([maps, good_map])
    both_masks = np.concatenate([masks, good_mask])
    assert abs(aupro(both_maps, both_masks) - 0.5) < TOL
    assert abs(aupro(maps, masks) - 7 / 12) < TOL
    assert abs(reference_aupro(both_maps, both_masks) - 0.5) < TOL


# ------------------------------------------------------------------------------------------
# random cases against the slow reference
# ------------------------------------------------------------------------------------------
def random_maps(seed: int, n: int = 5, size: int = 16, decimals: int | None = 2):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    masks[1, 2:6, 3:8] = 1
    masks[1, 9:11, 9:15] = 1
    masks[2, range(3, 12), range(2, 11)] = 1  # diagonal scratch
    masks[3, 12:15, 0:4] = 1
    maps = rng.random(masks.shape) + 0.35 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)  # ties inside and across regions / OK pixels
    return maps, masks


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("limit", [0.3, 0.05, 0.5, 1.0])
def test_matches_reference_on_random_maps(seed: int, limit: float) -> None:
    maps, masks = random_maps(seed)
    expected = reference_aupro(maps, masks, limit)
    assert abs(aupro(maps, masks, fpr_limit=limit) - expected) < TOL


def test_matches_reference_without_ties_and_as_lists_of_tensors() -> None:
    maps, masks = random_maps(7, decimals=None)
    expected = reference_aupro(maps, masks)
    assert abs(aupro(maps, masks) - expected) < TOL
    t_maps = [torch.from_numpy(m)[None] for m in maps]  # [1,h,w] tensors, float64
    t_masks = [torch.from_numpy(g) for g in masks]
    assert abs(aupro(t_maps, t_masks) - expected) < TOL


def test_lists_of_different_sizes_match_reference() -> None:
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for i, (h, w) in enumerate([(12, 9), (7, 15), (10, 10)]):
        g = np.zeros((h, w), dtype=np.uint8)
        if i != 1:
            g[2:5, 3:6] = 1
            g[6, 7:] = 1
        maps.append(np.round(rng.random((h, w)) + 0.3 * g, 2))
        masks.append(g)
    assert abs(aupro(maps, masks) - reference_aupro(maps, masks)) < TOL


def test_masks_0_255_and_float_masks() -> None:
    maps, masks = random_maps(1)
    expected = aupro(maps, masks)
    assert abs(aupro(maps, masks * 255) - expected) < TOL
    assert abs(aupro(maps, masks.astype(np.float32) * 0.7) - expected) < TOL
    t_maps, t_masks = torch.from_numpy(maps)[:, None], torch.from_numpy(masks * 255)[:, None]
    assert abs(aupro(t_maps, t_masks) - expected) < TOL


def test_float64_maps_are_not_cast_to_float32() -> None:
    """Region pixels 1e-10 above OK pixels: distinct in float64, tied in float32."""
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2:5, 2:5] = 1
    maps = np.ones((2, 8, 8))
    maps[masks == 1] += 1e-10
    assert abs(aupro(maps, masks) - 1.0) < TOL
    assert abs(aupro(torch.from_numpy(maps), torch.from_numpy(masks)) - 1.0) < TOL
    tied = aupro(maps.astype(np.float32), masks)
    assert tied < 0.9  # a float32 cast changes the number: this is what must not happen silently


def test_perfect_and_random_maps() -> None:
    _, masks = random_maps(0)
    assert abs(aupro(masks.astype(np.float64), masks) - 1.0) < TOL
    rng = np.random.default_rng(0)
    big_masks = np.zeros((20, 64, 64), dtype=np.uint8)
    big_masks[::2, 10:30, 20:40] = 1
    assert abs(aupro(rng.random(big_masks.shape), big_masks) - 0.15) < 0.01


def test_degenerate_inputs_give_nan_with_warning() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.warns(RuntimeWarning, match="no defect region"):
        assert math.isnan(aupro(maps, np.zeros((2, 8, 8))))
    with pytest.warns(RuntimeWarning, match="no defect-free"):
        assert math.isnan(aupro(maps, np.ones((2, 8, 8))))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, np.ones((2, 8, 8)), fpr_limit=0.0)


def test_evaluate_aupro_equals_aupro() -> None:
    maps, masks = random_maps(4)
    scores = maps.max(axis=(1, 2))
    labels = masks.any(axis=(1, 2))
    out = evaluate(scores, labels, maps, masks, fpr_limit=0.2)
    assert abs(out["aupro"] - reference_aupro(maps, masks, 0.2)) < TOL


# ------------------------------------------------------------------------------------------
# RD legacy PRO
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(2))
def test_rd_legacy_pro_matches_reference(seed: int) -> None:
    maps, masks = random_maps(seed, decimals=None)
    expected = reference_rd_legacy_pro(maps, masks)
    assert abs(rd_legacy_pro(maps, masks) - expected) < TOL
    out = evaluate(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    assert abs(out["rd_legacy_pro"] - expected) < TOL


def test_rd_legacy_pro_float32_and_ties_match_reference() -> None:
    maps, masks = random_maps(5, decimals=2)
    maps32 = maps.astype(np.float32)
    assert abs(rd_legacy_pro(maps32, masks) - reference_rd_legacy_pro(maps32, masks)) < TOL


def test_rd_legacy_pro_strict_threshold_on_grid_values() -> None:
    """Integer maps 0..200: every threshold equals pixel values, so `>` vs `>=` matters."""
    _, masks = random_maps(6)
    rng = np.random.default_rng(6)
    grid = np.minimum(rng.integers(0, 201, masks.shape) + 50 * masks, 200).astype(np.float64)
    grid[:, 0, 0], grid[:, 0, 1] = 0.0, 200.0
    expected = reference_rd_legacy_pro(grid, masks)
    assert abs(rd_legacy_pro(grid, masks) - expected) < TOL


def test_rd_legacy_pro_ignores_defect_free_images() -> None:
    maps, masks = random_maps(2, decimals=None)
    anomalous = masks.any(axis=(1, 2))
    only = rd_legacy_pro(maps[anomalous], masks[anomalous])
    assert abs(rd_legacy_pro(maps, masks) - only) < TOL
    changed = maps.copy()
    changed[~anomalous] = 10.0  # dominates the global FPR of the MVTec AU-PRO
    assert abs(rd_legacy_pro(changed, masks) - only) < TOL
    assert aupro(changed, masks) < aupro(maps, masks) - 0.1  # the two metrics differ


def test_rd_legacy_pro_without_anomalous_image_is_nan() -> None:
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.warns(RuntimeWarning, match="no anomalous image"):
        value = rd_legacy_pro(maps, np.zeros((2, 8, 8)))
    assert math.isnan(value)
