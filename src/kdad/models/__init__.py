"""Backbones and reusable blocks (RD bottleneck and decoder)."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``module`` (shared parameters counted once).

    With ``trainable_only=True`` only parameters with ``requires_grad`` are counted.
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


from kdad.models.backbones import (  # noqa: E402
    FeatureExtractor,
    build_backbone,
    imagenet_weights_available,
)
from kdad.models.rd_blocks import (  # noqa: E402
    OneClassBottleneck,
    ResNetDecoder,
    build_rd_student,
)

__all__ = [
    "FeatureExtractor",
    "OneClassBottleneck",
    "ResNetDecoder",
    "build_backbone",
    "build_rd_student",
    "count_parameters",
    "imagenet_weights_available",
]
