"""RD-family distillation losses against hand-written references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdad.errors import KdadError
from kdad.losses import cosine_distillation_loss


def _np_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _pyramid(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 8, 8), (2, 6, 4, 4), (2, 8, 2, 2)]
    t = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    s = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return t, s


def test_flat_loss_is_one_cosine_per_sample_and_level() -> None:
    t, s = _pyramid(0)
    expected = 0.0
    for tk, sk in zip(t, s):
        per_sample = [1 - _np_cos(tk[b].numpy().ravel(), sk[b].numpy().ravel()) for b in range(tk.shape[0])]
        expected += np.mean(per_sample)
    got = cosine_distillation_loss(t, s, kind="flat")
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, abs=1e-5)


def test_pixel_loss_is_mean_of_per_pixel_cosine_distance() -> None:
    t, s = _pyramid(1)
    expected = 0.0
    for tk, sk in zip(t, s):
        a, b = tk.numpy(), sk.numpy()
        B, _, H, W = a.shape
        values = [1 - _np_cos(a[i, :, y, x], b[i, :, y, x]) for i in range(B) for y in range(H) for x in range(W)]
        expected += np.mean(values)
    assert float(cosine_distillation_loss(t, s, kind="pixel")) == pytest.approx(expected, abs=1e-5)


def test_flat_and_pixel_differ_and_vanish_on_identical_features() -> None:
    t, s = _pyramid(2)
    assert float(cosine_distillation_loss(t, s, "flat")) != pytest.approx(
        float(cosine_distillation_loss(t, s, "pixel")), abs=1e-3
    )
    for kind in ("flat", "pixel", "concat"):
        assert float(cosine_distillation_loss(t, t, kind)) == pytest.approx(0.0, abs=1e-6)
        scaled = [2.5 * x for x in t]  # cosine ignores scale
        assert float(cosine_distillation_loss(t, scaled, kind)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_loss_is_a_one_line_error() -> None:
    t, s = _pyramid(3)
    with pytest.raises(KdadError, match=r"method.loss"):
        cosine_distillation_loss(t, s, kind="l2")


# ---------------------------------------------------------------------------------------------
# synthetic-anomaly masks at feature resolution
# ---------------------------------------------------------------------------------------------


def test_downsample_mask_modes_by_hand() -> None:
    from kdad.losses import downsample_mask

    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1, 1] = 1.0  # one pixel, not on the align_corners=True sampling grid of 4x4
    # align_corners=True samples rows/cols 0, 7/3, 14/3, 7: pixel (1, 1) weighs (1 - 1/... ) < 0.5
    assert downsample_mask(mask, (4, 4), "bilinear_threshold").sum().item() == 0.0
    pooled = downsample_mask(mask, (4, 4), "max_pool")
    assert pooled[0, 0, 0, 0].item() == 1.0 and pooled.sum().item() == 1.0  # the 2x2 cell holding it
    big = torch.zeros(1, 1, 8, 8)
    big[..., :4, :4] = 1.0
    expected = torch.zeros(1, 1, 4, 4)
    expected[..., :2, :2] = 1.0  # sample points 0 and 7/3 lie inside rows/cols 0..3
    assert torch.equal(downsample_mask(big, (4, 4), "bilinear_threshold"), expected)
    assert torch.equal(downsample_mask(big, (4, 4), "nearest"), expected)
    with pytest.raises(KdadError, match="max_pool"):
        downsample_mask(mask, (4, 4), "area")


def test_mask_pyramid_progressive_is_urds_overwriting_loop() -> None:
    from kdad.losses import downsample_mask, mask_pyramid

    torch.manual_seed(0)
    mask = (torch.rand(2, 1, 64, 64) > 0.6).float()
    sizes = [(16, 16), (8, 8), (4, 4)]
    direct = mask_pyramid(mask, sizes)
    assert all(torch.equal(d, downsample_mask(mask, s)) for d, s in zip(direct, sizes))
    progressive = mask_pyramid(mask, sizes, progressive=True)
    current, expected = mask, []
    for size in sizes:
        current = (
            torch.nn.functional.interpolate(current, size=size, mode="bilinear", align_corners=True) > 0.5
        ).float()
        expected.append(current)
    assert all(torch.equal(p, e) for p, e in zip(progressive, expected))
    assert torch.equal(progressive[0], direct[0])
    assert any(not torch.equal(p, d) for p, d in zip(progressive[1:], direct[1:]))  # they do differ
