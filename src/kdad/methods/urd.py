"""URD - "RD with Expert": Expert-Teacher-Student distillation with Guided Information Injection.

Liu, Wang, Leng, Zhang, "Unlocking the Potential of Reverse Distillation for Anomaly Detection",
AAAI 2025 (arXiv 2412.07579). Not to be confused with RD++ (Tien et al., CVPR 2023, "Revisiting
Reverse Distillation"), a different paper. Behaviour follows the official code ``hito2448/URD``
(spec ``rd_urd.md`` §3, §6):

- **expert** E: the ImageNet encoder (torchvision IMAGENET1K_V1, layer1-3), frozen, always in eval
  mode, never used at test time;
- **teacher** T: a second copy of the same encoder, *fine-tuned* (Adam lr 1e-4, betas (0.5, 0.999))
  to stay close to the expert on normal images and to move away from it inside synthetic
  anomalies ("anomaly amplification"); its BatchNorm runs in train mode during its update, so
  its running statistics follow normal and synthetic batches;
- **student** S: RD's OCBE and decoder plus injection modules that pass teacher features to the
  decoder (``injection: plain`` as released, ``guided`` = the similarity-gated GII);
  Adam lr 0.005, betas (0.5, 0.999); it reconstructs the *normal-image* features of both teacher
  and expert from normal and anomalous inputs;
- per iteration, in this order: expert forwards; teacher update (separate forwards for the normal
  and the synthetic batch); teacher in eval mode recomputes both feature pyramids with the updated
  weights; student update on them (again two separate forwards);
- training length in iterations (5,000; 10,000 for cable and transistor), rounded up to whole
  epochs as the official loop does;
- anomaly map from the fine-tuned teacher and the student (RD's map: per-level 1 - cos, add,
  Gaussian sigma 4, score = max).

Synthetic anomalies come from :mod:`kdad.data.synthesis` (Perlin masks, DTD or procedural
textures, per-category foreground restriction), set up by ``conf/method/urd.yaml``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.data.batch import Batch
from kdad.errors import KdadError, check_choice
from kdad.losses import flat_cosine_loss, mask_pyramid, pixel_cosine_loss
from kdad.methods.base import AnomalyModule, OptimizerFactory, SchedulerFactory
from kdad.models.backbones import build_backbone_with_fallback
from kdad.models.urd_blocks import URDStudent

LOSS_VERSIONS = ("head", "legacy_v0")
MASK_RESIZES = ("progressive", "direct")
TEACHER_BN_MODES = ("train", "eval")

Features = Sequence[Tensor]


# ---------------------------------------------------------------------------------------------
# losses (spec §3.3); every term is float32
# ---------------------------------------------------------------------------------------------


def mask_distance_l1(teacher_aug: Features, expert_normal: Features, masks: Sequence[Tensor]) -> Tensor:
    """Teacher term 2: ``sum_l mean |(1 - cos_c(T_l(x~), E_l(x))) - M_l|``.

    Pushes the teacher's feature of the synthetic image to cosine distance 0 from the expert's
    *normal-image* feature outside the defect and to distance 1 (orthogonal) inside it."""
    loss = torch.zeros((), device=masks[0].device)
    for t, e, m in zip(teacher_aug, expert_normal, masks):
        distance = 1.0 - F.cosine_similarity(t.float(), e.float(), dim=1).unsqueeze(1)  # [B,1,h,w]
        loss = loss + (distance - m).abs().mean()
    return loss


def flat_anti_alignment(a: Features, b: Features) -> Tensor:
    """``sum_l mean_b [1 + cos(vec a_l, vec b_l)]`` (legacy teacher term, weight 0.1)."""
    loss = torch.zeros((), device=a[0].device)
    for x, y in zip(a, b):
        loss = loss + (1.0 + F.cosine_similarity(x.float().flatten(1), y.float().flatten(1), dim=1)).mean()
    return loss


def masked_similarity(a: Features, b: Features, masks: Sequence[Tensor]) -> Tensor:
    """``sum_l mean [cos_c(a_l, b_l) * (1 - M_l)]``: the legacy student term as the code computes
    it (a double ``1 -`` made it the similarity itself, spec §3.3)."""
    loss = torch.zeros((), device=masks[0].device)
    for x, y, m in zip(a, b, masks):
        loss = loss + (F.cosine_similarity(x.float(), y.float(), dim=1).unsqueeze(1) * (1.0 - m)).mean()
    return loss


def urd_teacher_loss(
    teacher_normal: Features,
    teacher_aug: Features,
    expert_normal: Features,
    expert_aug: Features,
    masks: Sequence[Tensor],
    version: str = "head",
) -> dict[str, Tensor]:
    """The teacher's loss terms (their sum is the loss); ``masks`` at feature resolutions."""
    if version == "head":
        return {
            "normal": pixel_cosine_loss(expert_normal, teacher_normal),
            "mask_l1": mask_distance_l1(teacher_aug, expert_normal, masks),
            "aug": flat_cosine_loss(expert_aug, teacher_aug),
        }
    return {
        "normal": flat_cosine_loss(expert_normal, teacher_normal),
        "aug": flat_cosine_loss(expert_aug, teacher_aug),
        "mask_l1": mask_distance_l1(teacher_aug, expert_normal, masks),
        "anti": 0.1 * flat_anti_alignment(teacher_aug, expert_normal),
    }


def urd_student_loss(
    student_normal: Features,
    student_aug: Features,
    teacher_normal: Features,
    teacher_aug: Features,
    expert_normal: Features,
    expert_aug: Features,
    masks: Sequence[Tensor],
    version: str = "head",
) -> dict[str, Tensor]:
    """The student's loss terms: from normal or anomalous inputs, reconstruct the normal-image
    features of both teacher and expert (flat cosine, weight 1 each)."""
    terms = {
        "teacher_normal": flat_cosine_loss(teacher_normal, student_normal),
        "teacher_from_aug": flat_cosine_loss(teacher_normal, student_aug),
        "expert_normal": flat_cosine_loss(expert_normal, student_normal),
        "expert_from_aug": flat_cosine_loss(expert_normal, student_aug),
    }
    if version == "legacy_v0":
        terms["legacy_aug_teacher"] = 0.1 * masked_similarity(student_aug, teacher_aug, masks)
        terms["legacy_aug_expert"] = 0.1 * masked_similarity(student_aug, expert_aug, masks)
    return terms


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------


class UnlockedReverseDistillation(AnomalyModule):
    """URD ("RD with Expert"): frozen expert, fine-tuned teacher, RD student with injection.

    Args:
        backbone / weights: the encoder of expert and teacher (both start from the same weights).
        injection: ``plain`` (released code; default) or ``guided`` (similarity-gated GII).
        loss: ``head`` (code after the 2025-01-21 commits; default) or ``legacy_v0`` (first
            release, as in the shipped .pyc).
        mask_resize: ``progressive`` (the code: 256 -> 64 -> 32 -> 16, each level re-binarised
            from the previous one) or ``direct`` (every level from the full mask).
        teacher_bn: ``train`` (official: batch statistics and running-stat updates during the
            teacher step) or ``eval`` (a robustness ablation, not the paper).
        iterations: training iterations (optimiser steps of each network); the run lasts
            ``ceil(iterations / batches per epoch)`` whole epochs. ``None``: trainer.max_epochs.
        iterations_by_category: per-category overrides (MVTec: cable and transistor 10,000).
        legacy_unused_modules: build the official model's unused OCBE conv4/bn4 (and simattn in
            plain mode) for state-dict / registered-parameter parity.
        optimizer / teacher_optimizer: factories for the student's and the teacher's Adam.
    """

    method_name = "urd"
    input_multiple = 32  # RD's OCBE halves layer3 once more
    requires_synthesis = True
    ddp_unused_parameters = True  # the teacher's and the student's backward passes are separate

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        weights: str = "imagenet",
        injection: str = "plain",
        loss: str = "head",
        mask_resize: str = "progressive",
        teacher_bn: str = "train",
        iterations: int | None = 5000,
        iterations_by_category: Mapping[str, int] | None = None,
        legacy_unused_modules: bool = False,
        anomaly_map: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        teacher_optimizer: OptimizerFactory | None = None,
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
        self.save_hyperparameters(ignore=["optimizer", "teacher_optimizer", "scheduler"])
        for key, value, allowed in (
            ("loss", loss, LOSS_VERSIONS),
            ("mask_resize", mask_resize, MASK_RESIZES),
            ("teacher_bn", teacher_bn, TEACHER_BN_MODES),
        ):
            check_choice(f"method.{key}", value, allowed)
        if iterations is not None and int(iterations) < 1:
            raise KdadError(f"method.iterations={iterations} must be a positive number of iterations (or null)")
        if scheduler is not None:
            raise KdadError("urd trains without a learning-rate schedule (official code); set method.scheduler=null")
        self.automatic_optimization = False  # two optimisers, stepped teacher first
        self.loss_version = loss
        self.mask_resize = mask_resize
        self.teacher_bn = teacher_bn
        self.iterations = int(iterations) if iterations is not None else None
        self.iterations_by_category = {str(k): int(v) for k, v in dict(iterations_by_category or {}).items()}
        self.teacher_optimizer_factory = teacher_optimizer

        self.expert = build_backbone_with_fallback(backbone, weights)
        self.teacher = copy.deepcopy(self.expert)  # same initial weights (and BN statistics)
        self.freeze("expert")
        self.teacher.requires_grad_(True)
        self.student = URDStudent(backbone, injection=injection, legacy_unused_modules=legacy_unused_modules)

    @property
    def weights_source(self) -> str:
        return self.expert.weights_source

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.frozen_bn_calibrated and self.trainer.global_step == 0:
            # the teacher starts as an exact copy of the expert, BN statistics included
            self.teacher.load_state_dict(self.expert.state_dict())

    # ------------------------------------------------------------------ inference
    def teacher_student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Test time: the fine-tuned teacher (eval mode) and the student; no expert."""
        teacher = self.teacher(x)
        return teacher, self.student(teacher)

    # ------------------------------------------------------------------ schedule
    def training_iterations(self, category: str) -> int | None:
        """The iteration budget for ``category`` (``None``: use trainer.max_epochs)."""
        if self.iterations is None:
            return None
        return self.iterations_by_category.get(str(category), self.iterations)

    def planned_epochs(self, batches_per_epoch: int, category: str) -> int | None:
        iterations = self.training_iterations(category)
        if iterations is None:
            return None
        return max(1, math.ceil(iterations / max(1, batches_per_epoch)))

    # ------------------------------------------------------------------ optimisation
    def default_optimizer(self) -> OptimizerFactory:
        return partial(torch.optim.Adam, lr=0.005, betas=(0.5, 0.999))

    def configure_optimizers(self) -> Any:
        teacher_factory = self.teacher_optimizer_factory or partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.999))
        student_factory = self.optimizer_factory or self.default_optimizer()
        return [
            teacher_factory(params=list(self.teacher.parameters())),
            student_factory(params=list(self.student.parameters())),
        ]

    def _masks(self, mask: Tensor, features: Features) -> list[Tensor]:
        sizes = [f.shape[-2:] for f in features]
        return mask_pyramid(mask, sizes, "bilinear_threshold", progressive=self.mask_resize == "progressive")

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        opt_teacher, opt_student = self.optimizers()  # type: ignore[misc]
        x = self.normalize(batch.image)
        x_aug, mask = self.synthetic_view(batch)

        # 1. expert (frozen, eval)
        with torch.no_grad():
            expert_normal = self.expert(x)
            expert_aug = self.expert(x_aug)
        masks = self._masks(mask, expert_normal)

        # 2. teacher update; two separate forwards (separate BN batch statistics)
        self.teacher.train(self.teacher_bn == "train")
        teacher_terms = urd_teacher_loss(
            self.teacher(x), self.teacher(x_aug), expert_normal, expert_aug, masks, self.loss_version
        )
        teacher_loss = torch.stack(list(teacher_terms.values())).sum()
        opt_teacher.zero_grad()
        self.manual_backward(teacher_loss)
        opt_teacher.step()

        # 3. the updated teacher in eval mode gives the student's inputs and targets
        self.teacher.eval()
        with torch.no_grad():
            teacher_normal = self.teacher(x)
            teacher_aug = self.teacher(x_aug)

        # 4. student update; two separate forwards
        student_terms = urd_student_loss(
            self.student(teacher_normal),
            self.student(teacher_aug),
            teacher_normal,
            teacher_aug,
            expert_normal,
            expert_aug,
            masks,
            self.loss_version,
        )
        student_loss = torch.stack(list(student_terms.values())).sum()
        opt_student.zero_grad()
        self.manual_backward(student_loss)
        opt_student.step()

        size = len(batch)
        self.log(
            "train/loss_teacher", teacher_loss.detach(), on_step=True, on_epoch=True, batch_size=size, sync_dist=True
        )
        self.log(
            "train/loss_student", student_loss.detach(), on_step=True, on_epoch=True, batch_size=size, sync_dist=True
        )
        total = (teacher_loss + student_loss).detach()
        self.log("train/loss", total, prog_bar=True, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        return total
