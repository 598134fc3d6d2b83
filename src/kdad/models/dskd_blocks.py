"""DSKD's deep-feature (DF) embedding: the bottleneck between the two students.

Yao & Gao, "Dual-Student Knowledge Distillation Networks for Unsupervised Anomaly Detection",
arXiv 2402.00448. The paper's full text was not available to us: everything here is **our
reconstruction** (spec ``adps_tdad_dskd.md`` §4.3, tag [R]) on RD's blocks
(:mod:`kdad.models.rd_blocks`). The abstract only says that the students interact through a
"deep feature embedding" module; which features enter it and how they are fused is our choice,
exposed as ``df_input`` x ``df_type``:

``df_type="ocbe"`` (default)
    * one input pyramid (``df_input`` ``student_e``, the default, or ``teacher``): RD's OCBE
      unchanged (:class:`~kdad.models.rd_blocks.OneClassBottleneck`, MFF + OCE).
    * two input pyramids (``df_input="both"``, spec option A): :class:`DualViewBottleneck`,
      ``z = OCE(MFF_T(T1..3) || MFF_E(E1..3))``: one RD MFF per view (each ``3*C3@h3``),
      concatenated to ``6*C3@h3``, then an OCE stage whose first block takes ``6*C3`` channels
      (``2*C3@h3/2`` out, as RD's OCE).
``df_type="stage"`` (spec option B)
    :class:`DeepStageEmbedding`: a ResNet "layer4"-style stage (the teacher's block type and
    layer4 block count, stride 2) on the deepest level only, ``z = stage(E3)`` (or ``T3``, or
    ``T3 || E3`` for ``both``); for ``student_e`` this is S_e's extra layer4 stage feeding S_d.

Shapes at 256x256 input: resnet18 ``E = [64@64, 128@32, 256@16] -> z = 512@8``;
wide_resnet50_2 ``E = [256@64, 512@32, 1024@16] -> z = 2048@8`` (every variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdad.errors import check_choice
from kdad.models.rd_blocks import (
    RD_STUDENT_CONFIGS,
    OneClassBottleneck,
    ResNetDecoder,
    build_rd_student,
    rd_init,
    resnet_stage,
)

__all__ = [
    "DF_INPUTS",
    "DF_TYPES",
    "DeepStageEmbedding",
    "DualViewBottleneck",
    "build_dskd_student",
]

#: which feature pyramids feed the DF embedding (``teacher`` = no interaction: S_d is plain RD)
DF_INPUTS = ("student_e", "teacher", "both")
#: how the DF embedding is built
DF_TYPES = ("ocbe", "stage")

Pyramid = Sequence[Tensor]


def _multi_scale_fusion(backbone: str) -> OneClassBottleneck:
    """RD's MFF alone: an OCBE whose OCE is replaced by the identity, so ``forward`` returns the
    ``3*C3@h3`` concatenation (reuses rd_blocks' MFF layers instead of copying them)."""
    cfg = RD_STUDENT_CONFIGS[backbone]
    mff = OneClassBottleneck(cfg.block, cfg.encoder_channels, num_blocks=1, width_per_group=cfg.width_per_group)
    mff.bn_layer = nn.Sequential()  # identity: no OCE
    mff.out_channels = 3 * cfg.encoder_channels[2]
    return mff


class DualViewBottleneck(nn.Module):
    """Spec option A (our reconstruction): ``z = OCE(MFF_T(T) || MFF_E(E))``.

    ``mff_teacher`` / ``mff_student``: RD's MFF on each view, ``[C1@h1, C2@h2, C3@h3] ->
    3*C3@h3``; ``oce``: a stride-2 stage on the ``6*C3`` concatenation -> ``2*C3@h3/2``."""

    def __init__(self, backbone: str) -> None:
        super().__init__()
        cfg = RD_STUDENT_CONFIGS[backbone]
        c3 = cfg.encoder_channels[2]
        self.mff_teacher = _multi_scale_fusion(backbone)
        self.mff_student = _multi_scale_fusion(backbone)
        self.oce = rd_init(resnet_stage(cfg.block, 6 * c3, 2 * c3, cfg.ocbe_blocks, cfg.width_per_group))
        self.out_channels = 2 * c3

    def forward(self, teacher: Pyramid, student: Pyramid) -> Tensor:
        fused = torch.cat([self.mff_teacher(teacher), self.mff_student(student)], dim=1)  # [B,6*C3,h3,w3]
        return self.oce(fused).contiguous()  # [B,2*C3,h3/2,w3/2]


class DeepStageEmbedding(nn.Module):
    """Spec option B (our reconstruction): a layer4-style stage on the deepest level of each
    input pyramid, concatenated over pyramids: ``[n*C3@h3] -> 2*C3@h3/2``."""

    def __init__(self, backbone: str, num_views: int = 1) -> None:
        super().__init__()
        cfg = RD_STUDENT_CONFIGS[backbone]
        c3 = cfg.encoder_channels[2]
        self.stage = rd_init(resnet_stage(cfg.block, num_views * c3, 2 * c3, cfg.ocbe_blocks, cfg.width_per_group))
        self.out_channels = 2 * c3

    def forward(self, *pyramids: Pyramid) -> Tensor:
        deepest = torch.cat([p[-1] for p in pyramids], dim=1)  # [B,n*C3,h3,w3]
        return self.stage(deepest).contiguous()  # [B,2*C3,h3/2,w3/2]


def build_dskd_student(
    backbone: str, df_input: str = "student_e", df_type: str = "ocbe"
) -> tuple[nn.Module, ResNetDecoder]:
    """The DF embedding and S_d (RD's ``de_resnet`` decoder for ``backbone``).

    The embedding is called as ``embedding(*views)`` with ``views = [E]``, ``[T]`` or ``[T, E]``
    (``df_input`` ``student_e`` / ``teacher`` / ``both``)."""
    check_choice("method.df_input", df_input, DF_INPUTS)
    check_choice("method.df_type", df_type, DF_TYPES)
    ocbe, decoder = build_rd_student(backbone)  # RD's OCBE + de_resnet (one-line error for other backbones)
    if df_type == "ocbe" and df_input != "both":
        return ocbe, decoder
    num_views = 2 if df_input == "both" else 1
    embedding: nn.Module = (
        DualViewBottleneck(backbone) if df_type == "ocbe" else DeepStageEmbedding(backbone, num_views)
    )
    return embedding, decoder
