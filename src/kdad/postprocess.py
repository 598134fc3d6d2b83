"""Anomaly-map post-processing shared by all distillation methods (always float32).

Official RD recipe (``test.py::cal_anomaly_map`` + ``evaluation``, spec ``rd_urd.md`` §1.4):

1. per level ``m_k = 1 - cos_c(T_k, S_k)`` (``F.cosine_similarity``, dim 1, eps 1e-8);
2. bilinear upsampling to the image size with ``align_corners=True``;
3. sum over levels (``"add"``; ``"mul"`` multiplies instead);
4. ``scipy.ndimage.gaussian_filter(sigma=4)`` with scipy's defaults ``truncate=4`` (radius 16,
   33x33 kernel) and ``mode="reflect"``;
5. image score = max of the smoothed map.

Everything here is pure tensor code (no numpy/scipy), runs on any device and is safe under
autocast: inputs are cast to float32 and autocast is disabled inside.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AnomalyMapper",
    "GaussianBlur2d",
    "cosine_distance_maps",
    "fuse_maps",
    "gaussian_kernel1d",
    "image_score",
    "reflect_indices",
]


def _no_autocast(t: Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


def cosine_distance_maps(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
    """Per level ``1 - cos(t, s)`` over channels: ``[B,C,h,w] x2 -> [B,1,h,w]`` float32."""
    if len(teacher) != len(student):
        raise ValueError(f"got {len(teacher)} teacher and {len(student)} student feature levels")
    maps = []
    for t, s in zip(teacher, student, strict=True):
        with _no_autocast(t):
            sim = F.cosine_similarity(t.float(), s.float(), dim=1, eps=1e-8)  # [B,h,w]
        maps.append((1.0 - sim).unsqueeze(1))  # [B,1,h,w]
    return maps


def fuse_maps(
    maps: Sequence[Tensor],
    size: int | tuple[int, int],
    mode: str = "add",
    align_corners: bool = True,
) -> Tensor:
    """Bilinearly upsample every ``[B,1,h,w]`` map to ``size`` and sum (``"add"``) or multiply
    (``"mul"``) them. Returns ``[B,1,H,W]`` float32."""
    if mode not in ("add", "mul"):
        raise ValueError(f"anomaly map fusion mode must be 'add' or 'mul', got '{mode}'")
    if not maps:
        raise ValueError("fuse_maps needs at least one map")
    size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    fused: Tensor | None = None
    for m in maps:
        with _no_autocast(m):
            up = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=align_corners)
        if fused is None:
            fused = up
        else:
            fused = fused + up if mode == "add" else fused * up
    assert fused is not None
    return fused


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> Tensor:
    """scipy's 1-D Gaussian weights: radius ``int(truncate*sigma + 0.5)``, normalised to sum 1
    (float64, length ``2*radius+1``; 33 taps at sigma 4)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    phi = torch.exp(-0.5 / (float(sigma) ** 2) * x * x)
    return phi / phi.sum()


def reflect_indices(n: int, radius: int, device: torch.device | None = None) -> Tensor:
    """Source indices of a length-``n`` axis padded by ``radius`` on both sides with scipy's
    ``mode="reflect"`` (half-sample symmetric: ``d c b a | a b c d | d c b a``).

    The extension is periodic with period ``2n``, so it is also right when ``radius >= n``
    (scipy reflects repeatedly). This is torch's "symmetric" padding, *not*
    ``F.pad(mode="reflect")`` (which is scipy's ``"mirror"``).
    """
    idx = torch.arange(-radius, n + radius, device=device)
    period = torch.remainder(idx, 2 * n)
    return torch.where(period >= n, 2 * n - 1 - period, period)


class GaussianBlur2d(nn.Module):
    """Separable Gaussian smoothing equal to ``scipy.ndimage.gaussian_filter(x, sigma,
    mode="reflect", truncate=truncate)`` applied to every ``[H,W]`` plane of ``[B,C,H,W]``.

    Output is float32. ``sigma <= 0`` returns the input (as float32) unchanged.
    """

    kernel: Tensor

    def __init__(self, sigma: float = 4.0, truncate: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.truncate = float(truncate)
        if self.sigma > 0:
            kernel = gaussian_kernel1d(self.sigma, self.truncate).float()
        else:
            kernel = torch.ones(1)
        self.radius = (kernel.numel() - 1) // 2
        self.register_buffer("kernel", kernel, persistent=False)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, truncate={self.truncate}, kernel_size={2 * self.radius + 1}"

    def forward(self, x: Tensor) -> Tensor:
        if self.sigma <= 0 or self.radius == 0:
            return x.float()
        b, c, h, w = x.shape
        k = self.kernel.to(device=x.device, dtype=torch.float32)
        with _no_autocast(x):
            y = x.float().reshape(b * c, 1, h, w)
            y = y.index_select(2, reflect_indices(h, self.radius, x.device))  # [N,1,H+2r,W]
            y = F.conv2d(y, k.view(1, 1, -1, 1))  # [N,1,H,W]
            y = y.index_select(3, reflect_indices(w, self.radius, x.device))  # [N,1,H,W+2r]
            y = F.conv2d(y, k.view(1, 1, 1, -1))  # [N,1,H,W]
        return y.reshape(b, c, h, w)


def image_score(anomaly_map: Tensor) -> Tensor:
    """Image score = max over the (smoothed) map: ``[B,...] -> [B]`` float32."""
    return anomaly_map.float().flatten(1).amax(dim=1)


class AnomalyMapper(nn.Module):
    """Teacher/student features -> (smoothed anomaly map ``[B,1,H,W]`` float32, score ``[B]``).

    Args:
        mode: level fusion, ``"add"`` (official evaluation) or ``"mul"``.
        align_corners: bilinear upsampling flag (official: True).
        sigma: Gaussian sigma (official 4); ``<= 0`` disables smoothing.
        truncate: Gaussian truncation in sigmas (scipy default 4 -> 33x33 kernel at sigma 4).
    """

    def __init__(
        self,
        mode: str = "add",
        align_corners: bool = True,
        sigma: float = 4.0,
        truncate: float = 4.0,
    ) -> None:
        super().__init__()
        if mode not in ("add", "mul"):
            raise ValueError(f"anomaly map fusion mode must be 'add' or 'mul', got '{mode}'")
        self.mode = mode
        self.align_corners = align_corners
        self.blur = GaussianBlur2d(sigma=sigma, truncate=truncate)

    def forward(
        self,
        teacher_feats: Sequence[Tensor],
        student_feats: Sequence[Tensor],
        size: int | tuple[int, int],
    ) -> tuple[Tensor, Tensor]:
        maps = cosine_distance_maps(teacher_feats, student_feats)
        fused = fuse_maps(maps, size, mode=self.mode, align_corners=self.align_corners)  # [B,1,H,W]
        smoothed = self.blur(fused)
        return smoothed, image_score(smoothed)

    @staticmethod
    def image_score(anomaly_map: Tensor) -> Tensor:
        return image_score(anomaly_map)
