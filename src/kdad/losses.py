"""Distillation losses shared by the RD family (RD, URD, TDAD, DSKD).

All losses are computed in float32, also under mixed precision.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def cosine_distillation_loss(teacher: Sequence[Tensor], student: Sequence[Tensor], kind: str = "flat") -> Tensor:
    """Dispatch to one of :data:`COSINE_LOSSES` (``flat`` is RD's official code)."""
    if kind == "flat":
        return flat_cosine_loss(teacher, student)
    if kind == "pixel":
        return pixel_cosine_loss(teacher, student)
    if kind == "concat":
        return concat_cosine_loss(teacher, student)
    raise KdadError(f"unknown loss type '{kind}' (method.loss); use one of {', '.join(COSINE_LOSSES)}")


# ----------------------------------------------------------------------------------------------
# synthetic-anomaly masks at feature resolution (URD, ADPS, TDAD)
# ----------------------------------------------------------------------------------------------

MASK_DOWNSAMPLING = ("bilinear_threshold", "max_pool", "nearest")


def downsample_mask(mask: Tensor, size: Sequence[int], mode: str = "bilinear_threshold") -> Tensor:
    """A binary mask ``[B,1,H,W]`` brought to a feature map's ``size`` (float32 in {0, 1}).

    * ``bilinear_threshold``: bilinear resize with ``align_corners=True`` (URD's code), then
      ``> 0.5`` (the DeSTSeg/URD convention; tiny defects can vanish);
    * ``max_pool``: adaptive max pooling (a feature cell is anomalous if any pixel is);
    * ``nearest``: nearest-neighbour resize.
    """
    size = (int(size[0]), int(size[1]))
    mask = mask.float()
    if tuple(mask.shape[-2:]) == size:
        return (mask > 0.5).float()
    if mode == "bilinear_threshold":
        return (F.interpolate(mask, size=size, mode="bilinear", align_corners=True) > 0.5).float()
    if mode == "max_pool":
        return F.adaptive_max_pool2d(mask, size)
    if mode == "nearest":
        return (F.interpolate(mask, size=size, mode="nearest") > 0.5).float()
    raise KdadError(f"unknown mask downsampling '{mode}'; use one of {', '.join(MASK_DOWNSAMPLING)}")


def mask_pyramid(
    mask: Tensor, sizes: Sequence[Sequence[int]], mode: str = "bilinear_threshold", progressive: bool = False
) -> list[Tensor]:
    """One binary mask per feature level (``sizes`` in the features' order).

    ``progressive=True`` reproduces URD's loop, which overwrites its mask variable: each level
    is resized from the previous level's binarised mask (256 -> 64 -> 32 -> 16) instead of from
    the full-resolution mask.
    """
    masks: list[Tensor] = []
    current = mask
    for size in sizes:
        level = downsample_mask(current, size, mode)
        masks.append(level)
        if progressive:
            current = level
    return masks


# ----------------------------------------------------------------------------------------------
# focal loss on softmax probabilities (DRAEM's loss.py::FocalLoss semantics; ADPS)
# ----------------------------------------------------------------------------------------------


def focal_loss(probs: Tensor, target: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """Focal loss of DRAEM's ``FocalLoss`` (no alpha, mean reduction), on class *probabilities*.

    ``probs``: ``[B,C,H,W]`` (already softmax-ed); ``target``: ``[B,1,H,W]`` or ``[B,H,W]`` with
    class indices (a binary mask for C = 2). The one-hot target is clamped to
    ``[smooth/(C-1), 1-smooth]``, ``p_t = sum_c onehot_c * p_c + smooth`` and the loss is
    ``mean(-(1 - p_t)^gamma * log p_t)`` over all pixels (float32).
    """
    probs = probs.float()
    num_classes = probs.shape[1]
    labels = target.float().reshape(probs.shape[0], *probs.shape[2:]).round().long()  # [B,H,W]
    one_hot = F.one_hot(labels, num_classes).movedim(-1, 1).float()  # [B,C,H,W]
    if smooth:
        one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(dim=1) + smooth  # [B,H,W]
    # (1 - pt) can be -1e-8 from rounding when p_t ~ 1: clamped so fractional gammas stay finite
    return (-((1.0 - pt).clamp_min(0.0) ** gamma) * pt.log()).mean()
