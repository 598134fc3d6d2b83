"""Distillation losses shared by the RD family (RD, URD, TDAD, DSKD).

All losses are computed in float32, also under mixed precision.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.errors import KdadError

COSINE_LOSSES = ("flat", "pixel", "concat")


def _float32(features: Sequence[Tensor]) -> list[Tensor]:
    return [f.float() for f in features]


def flat_cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """RD's official loss (``main.py::loss_fucntion``).

    Per level k: ``mean_b [1 - cos(vec(T_k[b]), vec(S_k[b]))]`` where ``vec`` flattens C·H·W
    of one sample into one vector; summed over levels.
    """
    loss = torch.zeros((), device=teacher[0].device)
    for t, s in zip(_float32(teacher), _float32(student)):
        cos = F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)  # [B]
        loss = loss + (1.0 - cos).mean()
    return loss


def pixel_cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """The RD paper's form: per level, the mean over positions of the per-pixel (1 - cos)."""
    loss = torch.zeros((), device=teacher[0].device)
    for t, s in zip(_float32(teacher), _float32(student)):
        loss = loss + (1.0 - F.cosine_similarity(t, s, dim=1)).mean()
    return loss


def concat_cosine_loss(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """RD's unused ``loss_concat``: upsample every level to the first level's size,
    concatenate channels, per-pixel (1 - cos), mean."""
    size = teacher[0].shape[-2:]

    def stack(features: list[Tensor]) -> Tensor:
        return torch.cat(
            [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features],
            dim=1,
        )

    t, s = stack(_float32(teacher)), stack(_float32(student))
    return (1.0 - F.cosine_similarity(t, s, dim=1)).mean()


def cosine_distillation_loss(
    teacher: Sequence[Tensor], student: Sequence[Tensor], kind: str = "flat"
) -> Tensor:
    """Dispatch to one of :data:`COSINE_LOSSES` (``flat`` is RD's official code)."""
    if kind == "flat":
        return flat_cosine_loss(teacher, student)
    if kind == "pixel":
        return pixel_cosine_loss(teacher, student)
    if kind == "concat":
        return concat_cosine_loss(teacher, student)
    raise KdadError(f"unknown loss type '{kind}' (method.loss); use one of {', '.join(COSINE_LOSSES)}")
