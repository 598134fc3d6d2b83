"""Anomaly-map post-processing against independent references (scipy, numpy, hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from kdad.postprocess import (
    AnomalyMapper,
    GaussianBlur2d,
    cosine_distance_maps,
    fuse_maps,
    image_score,
)


def _scipy_blur(x: torch.Tensor, sigma: float = 4.0, truncate: float = 4.0) -> np.ndarray:
    """scipy reference, per [H,W] plane, in float64 (the official RD smoothing)."""
    arr = x.detach().double().numpy()
    out = np.empty_like(arr)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            out[b, c] = gaussian_filter(arr[b, c], sigma=sigma, mode="reflect", truncate=truncate)
    return out


def _bilinear_align_corners(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Slow, obviously-correct bilinear resize with align_corners=True semantics."""
    h, w = img.shape
    out = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = min(int(np.floor(y)), h - 1)
        y1 = min(y0 + 1, h - 1)
        dy = y - y0
        for j in range(out_w):
            x = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = min(int(np.floor(x)), w - 1)
            x1 = min(x0 + 1, w - 1)
            dx = x - x0
            top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
            bottom = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
            out[i, j] = top * (1 - dy) + bottom * dy
    return out


def _numpy_cosine_distance(t: np.ndarray, s: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    dot = (t * s).sum(axis=1)
    norms = np.sqrt((t * t).sum(axis=1)) * np.sqrt((s * s).sum(axis=1))
    return 1.0 - dot / np.maximum(norms, eps)


# ---------------------------------------------------------------------------------------------
# Gaussian smoothing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(256, 256), (64, 64), (48, 80), (17, 17), (16, 16), (7, 5), (1, 1)])
def test_gaussian_blur_matches_scipy_reflect(size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(size))
    x = torch.rand(2, 1, *size, generator=g) * 3.0
    got = GaussianBlur2d(sigma=4.0, truncate=4.0)(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    np.testing.assert_allclose(got.double().numpy(), _scipy_blur(x), atol=1e-5, rtol=0)


def test_gaussian_blur_other_sigma_and_channels() -> None:
    x = torch.rand(1, 3, 40, 30, generator=torch.Generator().manual_seed(0))
    got = GaussianBlur2d(sigma=2.5, truncate=3.0)(x)
    np.testing.assert_allclose(got.double().numpy(), _scipy_blur(x, 2.5, 3.0), atol=1e-5, rtol=0)


def test_gaussian_kernel_size_and_padding_trap() -> None:
    blur = GaussianBlur2d(sigma=4.0)
    assert blur.kernel.numel() == 33  # radius int(4*4 + 0.5) = 16
    assert "kernel" not in blur.state_dict()
    # F.pad(mode="reflect") is scipy's "mirror", not "reflect": it must give a different result
    # near the border, which the scipy comparison above would catch.
    x = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    k = blur.kernel
    wrong = F.pad(x, (16, 16, 16, 16), mode="reflect")
    wrong = F.conv2d(F.conv2d(wrong, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
    assert np.abs(wrong.double().numpy() - _scipy_blur(x)).max() > 1e-4


def test_sigma_zero_disables_smoothing() -> None:
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    out = GaussianBlur2d(sigma=0.0)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float())


# ---------------------------------------------------------------------------------------------
# cosine maps and fusion
# ---------------------------------------------------------------------------------------------


def test_cosine_distance_maps_match_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 7, 2, 2, generator=g)]
    s = [torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 7, 2, 2, generator=g)]
    s[0][0, :, 1, 1] = 2.5 * t[0][0, :, 1, 1]  # identical direction -> distance 0
    s[0][1, :, 0, 0] = -t[0][1, :, 0, 0]  # opposite -> distance 2
    t[1][0, :, 0, 0] = 0.0  # zero vector -> cosine 0 -> distance 1
    maps = cosine_distance_maps(t, s)
    for m, tt, ss in zip(maps, t, s, strict=True):
        assert m.dtype == torch.float32 and m.shape == (2, 1, *tt.shape[-2:])
        ref = _numpy_cosine_distance(tt.double().numpy(), ss.double().numpy())
        np.testing.assert_allclose(m[:, 0].double().numpy(), ref, atol=1e-6)
    assert abs(maps[0][0, 0, 1, 1].item()) < 1e-6
    assert abs(maps[0][1, 0, 0, 0].item() - 2.0) < 1e-6
    assert abs(maps[1][0, 0, 0, 0].item() - 1.0) < 1e-6


def test_fuse_hand_computed_2x2_to_3x3() -> None:
    a = torch.tensor([[0.0, 2.0], [4.0, 6.0]]).view(1, 1, 2, 2)
    b = torch.full((1, 1, 1, 1), 3.0)  # a constant level upsamples to a constant
    up_a = torch.tensor([[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]).view(1, 1, 3, 3)
    torch.testing.assert_close(fuse_maps([a, b], (3, 3), mode="add"), up_a + 3.0)
    torch.testing.assert_close(fuse_maps([a, b], 3, mode="mul"), up_a * 3.0)


def test_fuse_matches_slow_bilinear_reference() -> None:
    g = torch.Generator().manual_seed(0)
    levels = [
        torch.rand(2, 1, 4, 5, generator=g),
        torch.rand(2, 1, 2, 3, generator=g),
        torch.rand(2, 1, 9, 7, generator=g),
    ]
    for mode in ("add", "mul"):
        got = fuse_maps(levels, (9, 7), mode=mode).double().numpy()
        for i in range(2):
            ups = [_bilinear_align_corners(lv[i, 0].double().numpy(), 9, 7) for lv in levels]
            ref = ups[0] + ups[1] + ups[2] if mode == "add" else ups[0] * ups[1] * ups[2]
            np.testing.assert_allclose(got[i, 0], ref, atol=1e-6)
    with pytest.raises(ValueError):
        fuse_maps(levels, (9, 7), mode="max")


# ---------------------------------------------------------------------------------------------
# full mapper
# ---------------------------------------------------------------------------------------------


def _random_feats(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    t = [torch.randn(*sh, generator=g) for sh in shapes]
    s = [tt + 0.7 * torch.randn(*tt.shape, generator=g) for tt in t]
    return t, s


def test_mapper_matches_numpy_scipy_pipeline() -> None:
    t, s = _random_feats(0)
    amap, score = AnomalyMapper()(t, s, (64, 64))
    assert amap.shape == (2, 1, 64, 64) and amap.dtype == torch.float32
    assert score.shape == (2,) and score.dtype == torch.float32
    for i in range(2):
        fused = np.zeros((64, 64))
        for tt, ss in zip(t, s, strict=True):
            dist = _numpy_cosine_distance(tt[i : i + 1].double().numpy(), ss[i : i + 1].double().numpy())[0]
            fused += _bilinear_align_corners(dist, 64, 64)
        ref = gaussian_filter(fused, sigma=4, mode="reflect", truncate=4)
        np.testing.assert_allclose(amap[i, 0].double().numpy(), ref, atol=1e-5)
        assert score[i].item() == pytest.approx(ref.max(), abs=1e-5)
    torch.testing.assert_close(score, amap.flatten(1).max(dim=1).values)
    torch.testing.assert_close(AnomalyMapper.image_score(amap), image_score(amap))


def test_mapper_without_smoothing_and_mul() -> None:
    t, s = _random_feats(1)
    amap, score = AnomalyMapper(mode="mul", sigma=0)(t, s, 32)
    expected = fuse_maps(cosine_distance_maps(t, s), 32, mode="mul")
    torch.testing.assert_close(amap, expected)
    torch.testing.assert_close(score, expected.amax(dim=(1, 2, 3)))


def test_float32_under_bf16_autocast() -> None:
    t, s = _random_feats(2)
    t16 = [x.bfloat16() for x in t]
    s16 = [x.bfloat16() for x in s]
    mapper = AnomalyMapper()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps = cosine_distance_maps(t16, s16)
        amap, score = mapper(t16, s16, (64, 64))
    assert all(m.dtype == torch.float32 for m in maps)
    assert amap.dtype == torch.float32 and score.dtype == torch.float32
    # Identical to the float32 computation on the same (bf16-rounded) inputs.
    ref_map, ref_score = mapper([x.float() for x in t16], [x.float() for x in s16], (64, 64))
    torch.testing.assert_close(amap, ref_map)
    torch.testing.assert_close(score, ref_score)
