"""TDAD: Trident Distillations for Anomaly Detection -- OUR RECONSTRUCTION from the abstract.

Hu, Xie & Yu, "TDAD: Trident Distillations for Anomaly Detection", ICIP 2024,
DOI 10.1109/ICIP51287.2024.10647330. Only the abstract could be read and no official code
exists (spec ``adps_tdad_dskd.md`` §3). The abstract states: KD students over-generalise
(they imitate the teacher on unseen anomalies too); TDAD trains with a self-supervised *masked*
paradigm on *synthetic anomalies* and optimises three distillations together -- general
knowledge distillation (GKD), self-consistency distillation (SCD) and discrepancy maximisation
distillation (DMD) -- to widen the gap between teacher and student on abnormal features while
keeping normal features coherent. **Everything below beyond those names is our reconstruction**
(spec tag [R]); each reconstructed choice is a constructor option with the spec's default.
Results of this module must not be reported as the paper's.

Architecture (RD family, default ``student="rd"``):

- teacher T: a frozen ImageNet encoder (layer1..3), exactly RD's encoder;
- student S: RD's one-class bottleneck + reverse decoder on T's features,
  ``S(x) := D(OCBE(T(x)))`` (:mod:`kdad.models.rd_blocks`);
- option ``student="destseg"``: a trainable ResNet-18-layout encoder-decoder on the image
  (:class:`kdad.models.destseg_blocks.DeSTSegStudent`), ``S(x) := Student(x)``.

Views per training sample:

- ``x``: the clean image (ImageNet-normalised);
- ``x~ = Mask(Synth(x))``: ``Synth`` is the batch's synthetic-anomaly view (``data.synthesis``,
  DRAEM generator with probability 1.0) with anomaly mask ``Y``; ``Mask`` is random
  image-level patch masking (:func:`random_patch_mask`: ``mask_patch`` px square patches,
  exactly ``round(mask_ratio * n_patches)`` of them per image) with mask ``Z``; masked pixels
  are set to 0 in normalised space (the ImageNet mean colour).
- ``Z`` never enters ``Y``. A synthetic-anomaly pixel that was masked out no longer shows the
  anomaly, so by default it leaves ``Y`` too: ``Y := Y * (1 - Z)``
  (``masked_anomaly_pixels="drop"``; ``"keep"`` leaves ``Y`` as synthesised).

Losses (the "trident"; ``d = 1 - cos`` over channels per position, ``sg`` = stop-gradient):

- GKD = ``sum_k D(T_k(x), S_k(x))`` on clean images with RD's flat cosine (``loss="flat"``) or
  the per-pixel form (``"pixel"``). GKD alone *is* RD (same modules, same numbers).
- SCD = ``sum_k mean_p d(sg[target_k], S_k(x~))``: the student on the masked, anomalous view
  must reproduce its own detached clean-view prediction ``S_k(x)`` (``scd_target=
  "student_clean"``) or the teacher's clean features ``T_k(x)`` (``"teacher_clean"``).
- DMD = ``sum_k [sum_p Y_k[p] max(0, cos(T_k(x~), S_k(x~))[p] - m)] / (sum_p Y_k[p] + eps)``:
  inside the synthetic anomaly the student must move away from the teacher's features of the
  same anomalous image, with a hinge at margin ``m``; ``p`` runs over all positions of the
  batch; ``Y_k`` is ``Y`` resized to level k (:func:`kdad.losses.downsample_mask`).
- total = ``use_gkd * GKD + lambda_scd * use_scd * SCD + lambda_dmd * use_dmd * DMD``.

Anomaly map and score as RD: ``sum_k up(1 - cos(T_k(x), S_k(x)))``, Gaussian sigma 4, max.
Recipe (RD's): Adam lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs, 256x256.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdad.data.batch import Batch
from kdad.errors import KdadError, check_choice
from kdad.losses import cosine_distillation_loss, downsample_mask, mask_pyramid, pixel_cosine_loss
from kdad.methods.base import OptimizerFactory, SchedulerFactory
from kdad.methods.rd import ReverseDistillation
from kdad.models.destseg_blocks import DeSTSegStudent

__all__ = [
    "TridentDistillation",
    "discrepancy_maximisation_loss",
    "random_patch_mask",
    "self_consistency_loss",
]

STUDENTS = ("rd", "destseg")
SCD_TARGETS = ("student_clean", "teacher_clean")
MASKED_ANOMALY_PIXELS = ("drop", "keep")


def random_patch_mask(
    batch_size: int,
    height: int,
    width: int,
    patch: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random image-level patch masking (our reconstruction of TDAD's "masked" paradigm).

    The image is tiled by a grid of ``patch x patch`` cells (``ceil(H/patch) x ceil(W/patch)``;
    edge cells are cropped when ``patch`` does not divide the size). Every image gets exactly
    ``round(ratio * n_cells)`` masked cells (Python's ``round``), drawn uniformly without
    replacement from ``generator``. Returns ``Z``: float32 ``[B,1,H,W]`` in {0, 1}, 1 = masked.
    """
    if patch < 1:
        raise KdadError(f"method.mask_patch={patch}; use a patch size of at least 1 pixel")
    if not 0.0 <= ratio <= 1.0:
        raise KdadError(f"method.mask_ratio={ratio}; use a fraction in [0, 1]")
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    cells = rows * cols
    count = round(ratio * cells)
    grid = torch.zeros(batch_size, cells, device=device)
    if count:
        order = torch.rand(batch_size, cells, generator=generator, device=device).argsort(dim=1)
        grid.scatter_(1, order[:, :count], 1.0)
    grid = grid.view(batch_size, 1, rows, cols)
    grid = grid.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # [B,1,rows*p,cols*p]
    return grid[..., :height, :width].contiguous()  # [B,1,H,W]


def self_consistency_loss(target: Sequence[Tensor], student: Sequence[Tensor]) -> Tensor:
    """SCD (our reconstruction): ``sum_k mean_{b,p} [1 - cos(sg[target_k], student_k)]``, float32."""
    return pixel_cosine_loss([t.detach() for t in target], student)


def discrepancy_maximisation_loss(
    teacher: Sequence[Tensor],
    student: Sequence[Tensor],
    masks: Sequence[Tensor],
    margin: float = 0.5,
    eps: float = 1e-6,
) -> Tensor:
    """DMD (our reconstruction): hinge on the teacher-student cosine inside the anomaly.

    ``sum_k [sum_p Y_k[p] * max(0, cos(T_k, S_k)[p] - margin)] / (sum_p Y_k[p] + eps)`` with
    ``p`` over every position of the batch and ``masks`` the per-level ``Y_k`` ``[B,1,h_k,w_k]``.
    Zero where no level has anomalous positions. Float32.
    """
    loss = torch.zeros((), device=teacher[0].device)
    for t, s, y in zip(teacher, student, masks, strict=True):
        cos = F.cosine_similarity(t.float(), s.float(), dim=1).unsqueeze(1)  # [B,1,h,w]
        y = y.float()
        loss = loss + (y * (cos - margin).clamp_min(0.0)).sum() / (y.sum() + eps)
    return loss


class TridentDistillation(ReverseDistillation):
    """TDAD (our reconstruction from the abstract): RD + self-consistency + discrepancy
    maximisation on masked synthetic-anomaly views. See the module docstring.

    A subclass of :class:`ReverseDistillation`: with ``student="rd"`` the teacher, OCBE and
    decoder are RD's (same module names, so RD state dicts load), and with only GKD on the
    training step and the anomaly maps are RD's.

    Args:
        backbone, weights, loss, legacy_unused_conv4, cache_teacher, cache_teacher_max_gib: as RD
            (``loss`` is GKD's distance; the cache holds the teacher's clean-image features).
        student: ``rd`` (OCBE + decoder on teacher features, default) or ``destseg``
            (a trainable ResNet-18-layout encoder-decoder on the image).
        use_gkd, use_scd, use_dmd: switch each prong (GKD only = RD).
        scd_target: ``student_clean`` (detached ``S(x)``, default) or ``teacher_clean`` (``T(x)``).
        lambda_scd, lambda_dmd: loss weights (1.0 and 0.5).
        dmd_margin: DMD's hinge margin on the cosine similarity (0.5).
        dmd_mask_mode: how ``Y`` is resized to a feature level (``bilinear_threshold`` default,
            ``max_pool``, ``nearest``; :func:`kdad.losses.downsample_mask`).
        mask_patch, mask_ratio: patch masking of ``x~`` (16 px, 0.25; ratio 0 disables it).
        masked_anomaly_pixels: ``drop`` (``Y := Y * (1 - Z)``, default) or ``keep``.
        mask_seed: base seed of the patch masks; ``None`` uses Lightning's global seed
            (``PL_GLOBAL_SEED``, set by ``seed_everything``; 0 if unset). The masks of a training
            batch are drawn from a generator seeded by (base seed, epoch, batch index, rank), so
            they are reproducible (also after resuming) for a given device type.
    """

    method_name = "tdad"

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        weights: str = "imagenet",
        student: str = "rd",
        loss: str = "flat",
        use_gkd: bool = True,
        use_scd: bool = True,
        use_dmd: bool = True,
        scd_target: str = "student_clean",
        lambda_scd: float = 1.0,
        lambda_dmd: float = 0.5,
        dmd_margin: float = 0.5,
        dmd_mask_mode: str = "bilinear_threshold",
        mask_patch: int = 16,
        mask_ratio: float = 0.25,
        masked_anomaly_pixels: str = "drop",
        mask_seed: int | None = None,
        legacy_unused_conv4: bool = False,
        cache_teacher: bool = True,
        cache_teacher_max_gib: float = 8.0,
        anomaly_map: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        metrics: dict[str, Any] | None = None,
        calibrate_frozen_bn: bool | str = False,
    ) -> None:
        check_choice("method.student", student, STUDENTS)
        check_choice("method.scd_target", scd_target, SCD_TARGETS)
        check_choice("method.masked_anomaly_pixels", masked_anomaly_pixels, MASKED_ANOMALY_PIXELS)
        if not (use_gkd or use_scd or use_dmd):
            raise KdadError("method.use_gkd, use_scd and use_dmd are all false; switch on at least one loss")
        if student == "destseg" and legacy_unused_conv4:
            raise KdadError("method.legacy_unused_conv4=true only applies to student=rd; set it to false")
        random_patch_mask(1, 1, 1, int(mask_patch), float(mask_ratio))  # validate early
        downsample_mask(torch.zeros(1, 1, 2, 2), (1, 1), dmd_mask_mode)  # validate early
        super().__init__(
            backbone=backbone,
            weights=weights,
            loss=loss,
            legacy_unused_conv4=legacy_unused_conv4,
            cache_teacher=cache_teacher,
            cache_teacher_max_gib=cache_teacher_max_gib,
            anomaly_map=anomaly_map,
            optimizer=optimizer,
            scheduler=scheduler,
            metrics=metrics,
            calibrate_frozen_bn=calibrate_frozen_bn,  # type: ignore[arg-type]
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])  # TDAD's own arguments
        self.student_type = student
        self.use_gkd, self.use_scd, self.use_dmd = bool(use_gkd), bool(use_scd), bool(use_dmd)
        self.scd_target = scd_target
        self.lambda_scd, self.lambda_dmd = float(lambda_scd), float(lambda_dmd)
        self.dmd_margin = float(dmd_margin)
        self.dmd_mask_mode = dmd_mask_mode
        self.mask_patch, self.mask_ratio = int(mask_patch), float(mask_ratio)
        self.masked_anomaly_pixels = masked_anomaly_pixels
        self.mask_seed = mask_seed
        if student == "destseg":
            # RD's constructor built the OCBE + decoder; the image-level student replaces them.
            del self.bottleneck, self.decoder
            self.student = DeSTSegStudent(self.encoder.channels)

    @property
    def requires_synthesis(self) -> bool:  # type: ignore[override]
        """Synthetic anomalies are needed only by SCD and DMD (GKD-only runs without them)."""
        return self.use_scd or self.use_dmd

    # ------------------------------------------------------------------ model
    def student_features(self, x: Tensor, teacher: Sequence[Tensor]) -> list[Tensor]:
        """``S(x)`` in the teacher's order and shapes: ``D(OCBE(T(x)))`` or ``Student(x)``."""
        if self.student_type == "destseg":
            return self.student(x)
        return self.decoder(self.bottleneck(teacher))

    def teacher_student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        teacher = self.encoder(x)  # e.g. [256@H/4, 512@H/8, 1024@H/16] for WRN50-2
        return teacher, self.student_features(x, teacher)

    # ------------------------------------------------------------------ views
    def mask_generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        """The generator of one training batch's patch masks (see ``mask_seed``)."""
        base = self.mask_seed if self.mask_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", "0"))
        seed = ((int(base) * 1_000_003 + self.current_epoch) * 1_000_003 + int(batch_idx)) * 1_009 + self.global_rank
        generator = torch.Generator(device=device)
        generator.manual_seed(seed % (2**63))
        return generator

    def masked_view(self, batch: Batch, batch_idx: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """``(x~, Y, Z)``: the normalised masked synthetic-anomaly view, its anomaly mask and the
        patch mask, all at image resolution (``Y``, ``Z``: float32 ``[B,1,H,W]`` in {0,1})."""
        synthetic, anomaly = self.synthetic_view(batch)  # [B,3,H,W] normalised, [B,1,H,W]
        b, _, h, w = synthetic.shape
        generator = self.mask_generator(batch_idx, synthetic.device)
        patches = random_patch_mask(b, h, w, self.mask_patch, self.mask_ratio, generator, synthetic.device)
        masked = synthetic * (1.0 - patches)  # 0 in normalised space = ImageNet mean colour
        if self.masked_anomaly_pixels == "drop":
            anomaly = anomaly * (1.0 - patches)  # a masked-out pixel no longer shows the anomaly
        return masked, anomaly, patches

    # ------------------------------------------------------------------ training
    def training_losses(self, batch: Batch, batch_idx: int = 0) -> dict[str, Tensor]:
        """The switched-on prongs, unweighted: ``{"gkd", "scd", "dmd"}`` (float32 scalars)."""
        losses: dict[str, Tensor] = {}
        x = self.normalize(batch.image)
        teacher = self.frozen_features(self.encoder, x, batch.path)  # clean images: cached across epochs
        student: list[Tensor] | None = None
        if self.use_gkd:
            student = self.student_features(x, teacher)
            losses["gkd"] = cosine_distillation_loss(teacher, student, kind=self.loss_type)
        if not (self.use_scd or self.use_dmd):
            return losses

        masked, anomaly, _ = self.masked_view(batch, batch_idx)
        teacher_masked: list[Tensor] | None = None
        if self.student_type == "rd" or self.use_dmd:
            with torch.no_grad():
                teacher_masked = self.encoder(masked)
        student_masked = self.student_features(masked, teacher_masked or [])
        if self.use_scd:
            if self.scd_target == "teacher_clean":
                target = teacher
            else:
                if student is None:
                    with torch.no_grad():
                        student = self.student_features(x, teacher)
                target = student
            losses["scd"] = self_consistency_loss(target, student_masked)
        if self.use_dmd:
            assert teacher_masked is not None
            masks = mask_pyramid(anomaly, [t.shape[-2:] for t in teacher_masked], self.dmd_mask_mode)
            losses["dmd"] = discrepancy_maximisation_loss(teacher_masked, student_masked, masks, self.dmd_margin)
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        weights = {"gkd": 1.0, "scd": self.lambda_scd, "dmd": self.lambda_dmd}
        return sum((weights[name] * value for name, value in losses.items()), torch.zeros((), device=self.device))

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        losses = self.training_losses(batch, batch_idx)
        loss = self.total_loss(losses)
        size = len(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        for name, value in losses.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True, batch_size=size, sync_dist=True)
        return loss
