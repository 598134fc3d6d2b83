"""ADPS: Asymmetric Distillation Post-Segmentation.

Xing, Tang, Tang, Li, "ADPS: Asymmetric Distillation Post-Segmentation for Image Anomaly
Detection", IEEE TNNLS 36(4):7051-7064, 2025 (arXiv 2210.10495). No official code exists; this
follows the paper's text (spec ``adps_tdad_dskd.md`` §2). Provenance tags: [S] stated in the
paper, [I] inferred from it, [F] family convention (DRAEM), [R] *our reconstruction*.

Method:

- a pretrained teacher T, frozen, sees the whole image [S/I]; its backbone is not stated, WRN50
  is implied by the ablation text [I] (any kdad backbone works). Levels layer1-3 [R];
- a student S of the same architecture, randomly initialised [R, supported by I], sees the same
  image cut into k x k patches (k = 8 [S]) in one batched forward; its patch features are
  stitched back at their positions, at training and at test time [S];
- the Weight Mask Block: ``W_i = cos_c(T_i, S_i)`` per pixel, ``C_i = (1 - W_i) T_i`` [S];
- the Post-Segmentation Module, U-Net up-blocks -> 2-class softmax ``M`` at image size [S];
  start tensor, block count and widths are our reconstruction [R];
- training on DRAEM synthetic anomalies [S] (both networks see the same augmented image [I];
  anomaly probability 0.5 as in DRAEM [R/F]; ImageNet normalisation after augmentation [R]):
  ``L = L_d + lambda L_s`` with the mask-aware distillation loss ``L_d`` [S, Eq. 7] and the focal
  loss ``L_s`` on ``M`` [S, Eq. 8]; lambda = 1 [S]; focal gamma 2 (DRAEM) [R/F];
- anomaly map ``M[:,1]`` [S] (not smoothed unless ``smooth_map``); image score = max of the
  Gaussian-smoothed map [S], sigma 4 [R, RD convention];
- recipe [S]: 256x256, Adam lr 1e-4, batch 32, 300 epochs, lr x0.2 at epochs 240 and 270
  (DRAEM's MultiStepLR); student and PSM in one optimiser [R].
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from kdad.data.batch import Batch
from kdad.errors import KdadError, check_choice
from kdad.losses import MASK_DOWNSAMPLING, focal_loss
from kdad.methods.base import AnomalyModule, AnomalyOutput, OptimizerFactory, SchedulerFactory
from kdad.models.adps_blocks import (
    AsymmetricStudent,
    PostSegmentationModule,
    check_split_size,
    cosine_similarity_maps,
    mask_aware_distillation_loss,
    weight_mask_block,
)
from kdad.models.backbones import build_backbone, build_backbone_with_fallback
from kdad.postprocess import image_score

DEFAULT_LAYERS = ("layer1", "layer2", "layer3")


class AsymmetricDistillationPostSegmentation(AnomalyModule):
    """ADPS: frozen whole-image teacher, patch-wise student, WMB + PSM segmentation.

    Args:
        backbone: teacher (and student) architecture; the paper implies wide_resnet50_2 [I].
        weights: the teacher's weights (``imagenet``, ``none``, a file, ``imagenet_or_none``).
        layers: feature levels compared by the WMB (layer1-3, *our reconstruction* [R]).
        k: patches per side for the student (8 [S]; 1 = symmetric baseline). The image side
            must be a multiple of ``k * 16`` (layer3's stride) -- ``k**n * 16`` with ``n`` cuts.
        split_stages: where the student's input/features are cut (``[input]`` [S]; ``stage1``,
            ``stage2``: nested re-splitting after those stages, *our reconstruction* [R]).
        student_pretrained: initialise the student with the teacher's weights (default random
            init, *our reconstruction* [R] of "W/O T" reasoning).
        psm_widths: up-block widths (null: derived from the teacher's channels, [R]).
        detach_wmb: stop the segmentation loss reaching the student through ``W_i`` ([R]).
        mask_down: how the mask reaches feature resolution, ``bilinear_threshold`` | ``max_pool``
            (| ``nearest``) ([R]).
        clamp_neg: ``Y max(W, 0)`` instead of the literal ``Y W`` in ``L_d`` ([R]).
        focal_gamma: focal exponent (unspecified in the paper; 2 as in DRAEM [R/F]).
        lambda_seg: weight of the segmentation loss (1 [S]).
        smooth_map: also return the Gaussian-smoothed map as the anomaly map (default: the
            raw ``M[:,1]`` [S]; the image score always uses the smoothed map [S]).
        anomaly_map: options of the base's :class:`~kdad.postprocess.AnomalyMapper`; ADPS uses
            only its Gaussian (``sigma`` 4 [R], ``truncate``).
    """

    method_name = "adps"
    requires_synthesis = True
    input_multiple = 16  # per instance: k**n * (deepest stride), see __init__

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        weights: str = "imagenet",
        layers: Sequence[str] = DEFAULT_LAYERS,
        k: int = 8,
        split_stages: Sequence[str] = ("input",),
        student_pretrained: bool = False,
        psm_widths: Sequence[int] | None = None,
        detach_wmb: bool = False,
        mask_down: str = "bilinear_threshold",
        clamp_neg: bool = False,
        focal_gamma: float = 2.0,
        lambda_seg: float = 1.0,
        smooth_map: bool = False,
        anomaly_map: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        metrics: dict[str, Any] | None = None,
        calibrate_frozen_bn: bool | str = False,
    ) -> None:
        super().__init__(
            anomaly_map=anomaly_map,
            optimizer=optimizer,
            scheduler=scheduler,
            metrics=metrics,
            calibrate_frozen_bn=calibrate_frozen_bn,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        check_choice("method.mask_down", mask_down, MASK_DOWNSAMPLING)
        if float(focal_gamma) < 0:
            raise KdadError(f"method.focal_gamma={focal_gamma} must be >= 0 (2 as in DRAEM)")
        self.mask_down = mask_down
        self.clamp_neg = bool(clamp_neg)
        self.detach_wmb = bool(detach_wmb)
        self.focal_gamma = float(focal_gamma)
        self.lambda_seg = float(lambda_seg)
        self.smooth_map = bool(smooth_map)
        layers = list(layers)

        self.teacher = build_backbone_with_fallback(backbone, weights, layers)
        self.freeze("teacher")
        student_backbone = (  # random init unless asked ([R])
            build_backbone_with_fallback(backbone, weights, layers)
            if student_pretrained
            else build_backbone(backbone, "none", layers)
        )
        self.student = AsymmetricStudent(student_backbone, k=k, split_stages=split_stages)
        self.psm = PostSegmentationModule(self.teacher.channels, self.teacher.reductions, psm_widths)
        self.input_multiple = self.student.input_multiple

    @property
    def weights_source(self) -> str:
        return self.teacher.weights_source

    def default_optimizer(self) -> OptimizerFactory:
        return partial(torch.optim.Adam, lr=1e-4)

    def normalize(self, images: Tensor) -> Tensor:
        """The base's normalisation, after a size check that names ``data.image_size`` and ``k``."""
        s = self.student
        check_split_size(images.shape[-2], images.shape[-1], s.k, s.num_splits, max(s.reductions))
        return super().normalize(images)

    # ------------------------------------------------------------------ the model
    def segment(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Normalised images -> (``M`` softmax ``[B,2,H,W]`` float32, ``W_i`` maps ``[B,1,h_i,w_i]``)."""
        with torch.no_grad():
            teacher = self.teacher(x)  # [256@H/4, 512@H/8, 1024@H/16] for WRN50
        student = self.student(x)  # stitched patch features, the teacher's shapes
        similarity = cosine_similarity_maps(teacher, student)  # W_i
        weighted = weight_mask_block(teacher, similarity, detach=self.detach_wmb)  # C_i
        probs = self.psm(weighted)  # [B,2,H,W]
        if probs.shape[-2:] != x.shape[-2:]:
            raise KdadError(
                f"ADPS segmentation is {tuple(probs.shape[-2:])} for {tuple(x.shape[-2:])} images; "
                "check backbone.layers"
            )
        return probs, similarity

    def anomaly_output(self, x: Tensor) -> AnomalyOutput:
        probs, _ = self.segment(x)
        raw = probs[:, 1:2].float()  # [B,1,H,W] P(anomalous)
        smoothed = self.mapper.blur(raw)
        return AnomalyOutput(smoothed if self.smooth_map else raw, image_score(smoothed))

    # ------------------------------------------------------------------ training
    def losses(self, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """``L_d``, ``L_s`` and ``L = L_d + lambda L_s`` for normalised images and masks [B,1,H,W]."""
        probs, similarity = self.segment(x)
        distill = mask_aware_distillation_loss(similarity, mask, self.mask_down, self.clamp_neg)
        seg = focal_loss(probs, mask, gamma=self.focal_gamma)
        return {"loss": distill + self.lambda_seg * seg, "loss_distill": distill, "loss_seg": seg}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, mask = self.synthetic_view(batch)  # same augmented image for teacher and student
        losses = self.losses(x, mask)
        self.log(
            "train/loss",
            losses["loss"],
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=len(batch),
            sync_dist=True,
        )
        self.log_dict(
            {f"train/{name}": losses[name] for name in ("loss_distill", "loss_seg")},
            on_step=False,
            on_epoch=True,
            batch_size=len(batch),
            sync_dist=True,
        )
        return losses["loss"]
