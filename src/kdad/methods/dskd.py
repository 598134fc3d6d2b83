"""DSKD - Dual-Student Knowledge Distillation (**our reconstruction**).

Yao & Gao, "Dual-Student Knowledge Distillation Networks for Unsupervised Anomaly Detection",
arXiv 2402.00448 (2024). Not the homonymous Complex & Intelligent Systems 2024 paper (forward +
reverse students with a learned fusion) nor Xu et al.'s TII 2025 "DSKD".

**The paper's full text was not available** (no figures, equations, tables, or official code):
this design is our reconstruction from the abstract and the RD/STPM family (spec
``adps_tdad_dskd.md`` §4). Results of this module must not be reported as the paper's.

What the abstract states: one pretrained teacher and two students of the same scale with
*inverted* structures, trained by pyramid matching, interacting through a deep-feature (DF)
embedding module; pixel anomaly maps from the teacher-student discrepancies; good results with
small backbones such as ResNet18.

Our reconstruction (every choice is a constructor argument / config key):

- **teacher T**: ``backbone`` (default resnet18), layer1-3, frozen in eval mode, no grad;
- **encoder student S_e**: the teacher's layout (stem + layer1..3), random init
  (``student_pretrained=True`` starts it from the teacher's weights instead), fed the image:
  ``E = S_e(x) = [E1, E2, E3]`` (STPM-style forward distillation);
- **DF embedding**: RD's one-class bottleneck (OCBE = MFF + OCE) on S_e's pyramid,
  ``z = OCBE(E)``; it is the only link between the students, so S_d's loss also trains S_e
  ("interaction"). Options (:mod:`kdad.models.dskd_blocks`): ``df_input="both"`` =
  ``OCE(MFF(T) || MFF(E))``; ``df_type="stage"`` = a layer4-style stage on the deepest level;
  ``df_input="teacher"`` = ``OCBE(T)``: no interaction, S_d is plain RD;
- **decoder student S_d**: RD's mirrored ``de_resnet`` decoder, ``D = S_d(z) = [D1, D2, D3]``
  in the teacher's order (reverse distillation);
- **loss** (pyramid matching): ``L = alpha * sum_k D_e(T_k, E_k) + beta * sum_k D_d(T_k, D_k)``,
  ``D_e`` per-pixel cosine (STPM), ``D_d`` flattened cosine (RD), ``alpha = beta = 1``;
  teacher features detached;
- **anomaly map**: per level ``A_k = w_e (1 - cos(T_k, E_k)) + w_d (1 - cos(T_k, D_k))``
  (``student_fusion=mean``, ``w_e = w_d = 0.5``; ``max``/``mul`` as options) at the feature
  resolution, bilinear upsampling (``align_corners=True``) to the image, sum over levels
  (``scale_fusion=sum``; ``mul`` as option), Gaussian sigma 4; image score = max;
- **recipe**: one Adam over S_e, DF and S_d, lr 0.005, betas (0.5, 0.999); batch 16, 200 epochs,
  256x256 (RD's recipe).

Ablations: ``use_se=False`` drops S_e's loss and map (with ``df_input="teacher"`` S_e is not built
and the model *is* RD; with ``student_e``/``both`` S_e still exists as S_d's trainable front end,
trained only through S_d's loss); ``use_sd=False`` drops DF and S_d (S_e alone: STPM-like).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kdad.data.batch import Batch
from kdad.errors import KdadError, check_choice
from kdad.losses import COSINE_LOSSES, cosine_distillation_loss
from kdad.methods.base import AnomalyModule, AnomalyOutput, OptimizerFactory, SchedulerFactory
from kdad.models.backbones import build_backbone_with_fallback
from kdad.models.dskd_blocks import DF_INPUTS, DF_TYPES, build_dskd_student
from kdad.models.rd_blocks import RD_STUDENT_CONFIGS
from kdad.postprocess import cosine_distance_maps, fuse_maps, image_score

log = logging.getLogger(__name__)

STUDENT_FUSIONS = ("mean", "max", "mul")
SCALE_FUSIONS = ("sum", "mul")


class DualStudentFeatures(NamedTuple):
    """Every stage's output (``None`` for a stage the configuration does not build/use)."""

    teacher: list[Tensor]  # [T1, T2, T3], e.g. [64@64, 128@32, 256@16] for resnet18 at 256
    student_e: list[Tensor] | None  # S_e's [E1, E2, E3], same shapes
    embedding: Tensor | None  # z, e.g. 512@8
    student_d: list[Tensor] | None  # S_d's [D1, D2, D3], same shapes as the teacher's


def fuse_students(
    maps_e: list[Tensor], maps_d: list[Tensor], mode: str = "mean", w_e: float = 0.5, w_d: float = 0.5
) -> list[Tensor]:
    """Per level, fuse the two students' ``[B,1,h,w]`` discrepancy maps (our reconstruction):
    ``mean``: ``w_e*a + w_d*b`` (a mean for ``w_e + w_d = 1``); ``max``: ``max(w_e*a, w_d*b)``;
    ``mul``: ``(w_e*a) * (w_d*b)``."""
    check_choice("method.student_fusion", mode, STUDENT_FUSIONS)
    fused = []
    for a, b in zip(maps_e, maps_d, strict=True):
        a, b = w_e * a.float(), w_d * b.float()
        fused.append(a + b if mode == "mean" else torch.maximum(a, b) if mode == "max" else a * b)
    return fused


class DualStudentKD(AnomalyModule):
    """DSKD (our reconstruction): frozen teacher, encoder student S_e, DF embedding, decoder
    student S_d; see the module docstring.

    Args:
        backbone: teacher (and S_e) network; S_d needs an RD layout (resnet18, resnet34, resnet50,
            wide_resnet50_2).
        weights: the teacher's weights (``imagenet``, ``none``, a state-dict path,
            ``imagenet_or_none``).
        student_pretrained: start S_e from ``weights`` instead of random init.
        use_se / use_sd: train and map with S_e / S_d (ablations; at least one).
        df_input: ``student_e`` (default) | ``teacher`` (no interaction) | ``both``.
        df_type: ``ocbe`` (RD's bottleneck, default) | ``stage`` (layer4-style stage on level 3).
        loss_mode_e / loss_mode_d: ``pixel`` | ``flat`` | ``concat`` (:mod:`kdad.losses`).
        alpha / beta: weights of S_e's and S_d's pyramid losses.
        student_fusion: ``mean`` | ``max`` | ``mul``; ``w_e`` / ``w_d`` the students' map weights.
        scale_fusion: ``sum`` | ``mul`` over the upsampled levels.
        anomaly_map: ``align_corners``, ``sigma``, ``truncate`` of the map (no ``mode``: use
            ``scale_fusion``).
    """

    method_name = "dskd"
    input_multiple = 32  # the OCBE halves layer3 (stride 16) once more

    def __init__(
        self,
        backbone: str = "resnet18",
        weights: str = "imagenet",
        student_pretrained: bool = False,
        use_se: bool = True,
        use_sd: bool = True,
        df_input: str = "student_e",
        df_type: str = "ocbe",
        loss_mode_e: str = "pixel",
        loss_mode_d: str = "flat",
        alpha: float = 1.0,
        beta: float = 1.0,
        student_fusion: str = "mean",
        scale_fusion: str = "sum",
        w_e: float = 0.5,
        w_d: float = 0.5,
        anomaly_map: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        metrics: dict[str, Any] | None = None,
        calibrate_frozen_bn: bool | str = False,
    ) -> None:
        map_options = dict(anomaly_map or {})
        check_choice("method.scale_fusion", scale_fusion, SCALE_FUSIONS)
        mode = "add" if scale_fusion == "sum" else "mul"
        if map_options.get("mode", mode) != mode:
            raise KdadError(
                f"method.anomaly_map.mode={map_options['mode']} contradicts method.scale_fusion={scale_fusion}; "
                "dskd fuses levels by method.scale_fusion (sum|mul): remove method.anomaly_map.mode"
            )
        super().__init__(
            anomaly_map={**map_options, "mode": mode},
            optimizer=optimizer,
            scheduler=scheduler,
            metrics=metrics,
            calibrate_frozen_bn=calibrate_frozen_bn,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        if not (use_se or use_sd):
            raise KdadError("method.use_se and method.use_sd are both false: dskd needs at least one student")
        for key, value, allowed in (
            ("df_input", df_input, DF_INPUTS),
            ("df_type", df_type, DF_TYPES),
            ("loss_mode_e", loss_mode_e, COSINE_LOSSES),
            ("loss_mode_d", loss_mode_d, COSINE_LOSSES),
            ("student_fusion", student_fusion, STUDENT_FUSIONS),
        ):
            check_choice(f"method.{key}", value, allowed)
        for key, value in (("alpha", alpha), ("beta", beta), ("w_e", w_e), ("w_d", w_d)):
            if float(value) < 0:
                raise KdadError(f"method.{key}={value} must be >= 0")
        if use_sd and backbone not in RD_STUDENT_CONFIGS:
            raise KdadError(
                f"dskd's decoder student S_d needs an RD decoder layout, which backbone '{backbone}' has not; "
                f"use backbone={'|'.join(RD_STUDENT_CONFIGS)} or method.use_sd=false (S_e only)"
            )
        self.use_se, self.use_sd = bool(use_se), bool(use_sd)
        self.df_input = df_input
        self.loss_mode_e, self.loss_mode_d = loss_mode_e, loss_mode_d
        self.alpha, self.beta = float(alpha), float(beta)
        self.student_fusion = student_fusion
        self.w_e, self.w_d = float(w_e), float(w_d)

        self.teacher = build_backbone_with_fallback(backbone, weights)
        self.freeze("teacher")
        # S_e exists when it is a student or when it feeds the DF embedding
        needs_se = self.use_se or (self.use_sd and df_input != "teacher")
        self.student_e = (
            build_backbone_with_fallback(backbone, weights if student_pretrained else "none") if needs_se else None
        )
        if needs_se and not self.use_se:
            log.info(
                "dskd: use_se=false with df_input=%s: S_e is trained only through S_d's loss and not mapped", df_input
            )
        self.bottleneck, self.decoder = build_dskd_student(backbone, df_input, df_type) if self.use_sd else (None, None)

    @property
    def weights_source(self) -> str:
        return self.teacher.weights_source

    def default_optimizer(self) -> OptimizerFactory:
        return partial(torch.optim.Adam, lr=0.005, betas=(0.5, 0.999))

    # ------------------------------------------------------------------ networks
    def pyramids(self, x: Tensor) -> DualStudentFeatures:
        """Normalised images -> every stage's features (teacher without grad)."""
        with torch.no_grad():
            teacher = self.teacher(x)  # [C1@H/4, C2@H/8, C3@H/16]
        student_e = self.student_e(x) if self.student_e is not None else None  # same shapes
        embedding = student_d = None
        if self.bottleneck is not None and self.decoder is not None:
            views = {"student_e": [student_e], "teacher": [teacher], "both": [teacher, student_e]}[self.df_input]
            embedding = self.bottleneck(*views)  # [B,2*C3,H/32,W/32]
            student_d = self.decoder(embedding)  # teacher's shapes and order
        return DualStudentFeatures(teacher, student_e, embedding, student_d)

    # ------------------------------------------------------------------ loss
    def distillation_losses(
        self, teacher: list[Tensor], student_e: list[Tensor] | None, student_d: list[Tensor] | None
    ) -> dict[str, Tensor]:
        """``loss = alpha * L_e + beta * L_d`` (float32) with the per-student terms (pyramid
        matching on layer1-3; a student that is switched off contributes nothing)."""
        teacher = [t.detach() for t in teacher]
        loss = torch.zeros((), device=teacher[0].device)
        terms: dict[str, Tensor] = {}
        if self.use_se and student_e is not None:
            terms["loss_e"] = cosine_distillation_loss(teacher, student_e, kind=self.loss_mode_e)
            loss = loss + self.alpha * terms["loss_e"]
        if self.use_sd and student_d is not None:
            terms["loss_d"] = cosine_distillation_loss(teacher, student_d, kind=self.loss_mode_d)
            loss = loss + self.beta * terms["loss_d"]
        return {"loss": loss, **terms}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        features = self.pyramids(self.normalize(batch.image))
        losses = self.distillation_losses(features.teacher, features.student_e, features.student_d)
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value,
                prog_bar=name == "loss",
                on_step=True,
                on_epoch=True,
                batch_size=len(batch),
                sync_dist=True,
            )
        return losses["loss"]

    # ------------------------------------------------------------------ anomaly map
    def fused_map(
        self,
        teacher: list[Tensor],
        student_e: list[Tensor] | None,
        student_d: list[Tensor] | None,
        size: tuple[int, int],
    ) -> Tensor:
        """Smoothed anomaly map ``[B,1,H,W]`` float32: students fused per level (a single
        student's map is used unweighted), levels upsampled and fused, Gaussian blur."""
        maps_e = cosine_distance_maps(teacher, student_e) if self.use_se and student_e is not None else None
        maps_d = cosine_distance_maps(teacher, student_d) if self.use_sd and student_d is not None else None
        if maps_e is not None and maps_d is not None:
            levels = fuse_students(maps_e, maps_d, self.student_fusion, self.w_e, self.w_d)
        else:
            levels = maps_e if maps_e is not None else maps_d
        assert levels is not None
        fused = fuse_maps(levels, size, mode=self.mapper.mode, align_corners=self.mapper.align_corners)  # [B,1,H,W]
        return self.mapper.blur(fused)

    def anomaly_output(self, x: Tensor) -> AnomalyOutput:
        features = self.pyramids(x)
        anomaly_map = self.fused_map(features.teacher, features.student_e, features.student_d, tuple(x.shape[-2:]))
        return AnomalyOutput(anomaly_map, image_score(anomaly_map))
