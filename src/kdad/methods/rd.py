"""Reverse Distillation (RD / RD4AD).

Deng & Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding", CVPR 2022
(arXiv 2201.10703). Behaviour follows the official code ``hq-deng/RD4AD`` (spec: ``rd_urd.md``
§1-2):

- a frozen ImageNet encoder E (torchvision IMAGENET1K_V1, layer1-3), kept in eval mode (its BN
  uses ImageNet statistics) and run without grad;
- a trainable one-class bottleneck OCBE (multi-scale feature fusion + one-class embedding) and
  a trainable "reverse" ResNet decoder D that reconstructs E's three feature maps;
- loss: the official flattened cosine ``sum_k mean_b [1 - cos(vec E_k, vec D_k)]`` (``flat``;
  the paper's per-pixel form is ``pixel``);
- anomaly map: sum over levels of the per-pixel 1 - cos, bilinear (align_corners=True) to the
  input size, Gaussian sigma 4; image score = max;
- recipe: Adam lr 0.005, betas (0.5, 0.999), batch 16, 200 epochs, 256x256, no augmentation.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor

from kdad.data.batch import Batch
from kdad.losses import cosine_distillation_loss
from kdad.methods.base import AnomalyModule, OptimizerFactory, SchedulerFactory
from kdad.models.backbones import build_backbone_with_fallback
from kdad.models.rd_blocks import build_rd_student


class ReverseDistillation(AnomalyModule):
    """RD: frozen encoder -> OCBE -> decoder, trained to reproduce the encoder's features.

    Args:
        backbone: encoder name (resnet18, resnet34, resnet50, wide_resnet50_2).
        weights: ``imagenet`` (torchvision IMAGENET1K_V1), ``none`` (random init), a path to a
            local state dict, or ``imagenet_or_none`` (demo only: falls back, loudly, to random).
        loss: ``flat`` (official code, default), ``pixel`` (paper) or ``concat``.
        legacy_unused_conv4: build the OCBE's dead conv4/bn4 (official checkpoints' keys).
        cache_teacher: compute the frozen encoder's features of each training image once and
            reuse them in later epochs (a speed-up, not in the official code: the encoder is
            frozen, in eval mode, and kdad trains without augmentation, so they never change).
        cache_teacher_max_gib: memory bound of that cache (WRN50-2 at 256 px: 7 MiB per image).
    """

    method_name = "rd"
    input_multiple = 32  # the OCBE halves layer3 (stride 16) once more

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        weights: str = "imagenet",
        loss: str = "flat",
        legacy_unused_conv4: bool = False,
        cache_teacher: bool = True,
        cache_teacher_max_gib: float = 8.0,
        anomaly_map: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        metrics: dict[str, Any] | None = None,
        calibrate_frozen_bn: bool = False,
    ) -> None:
        super().__init__(
            anomaly_map=anomaly_map,
            optimizer=optimizer,
            scheduler=scheduler,
            metrics=metrics,
            calibrate_frozen_bn=calibrate_frozen_bn,
        )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.loss_type = loss
        cosine_distillation_loss([torch.zeros(1, 1)], [torch.zeros(1, 1)], kind=loss)  # validate early
        self.encoder = build_backbone_with_fallback(backbone, weights)
        self.freeze("encoder")
        self.bottleneck, self.decoder = build_rd_student(backbone, legacy_unused_conv4=legacy_unused_conv4)
        self.enable_feature_cache(cache_teacher, cache_teacher_max_gib)

    @property
    def ddp_unused_parameters(self) -> bool:  # type: ignore[override]
        """The legacy conv4/bn4 never receive gradients."""
        return bool(self.hparams.get("legacy_unused_conv4", False))

    @property
    def weights_source(self) -> str:
        return self.encoder.weights_source

    def default_optimizer(self) -> OptimizerFactory:
        return partial(torch.optim.Adam, lr=0.005, betas=(0.5, 0.999))

    def teacher_student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        teacher = self.encoder(x)  # [256@H/4, 512@H/8, 1024@H/16] for WRN50-2
        student = self.decoder(self.bottleneck(teacher))  # same shapes, same order
        return teacher, student

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x = self.normalize(batch.image)
        teacher = self.frozen_features(self.encoder, x, batch.path)
        student = self.decoder(self.bottleneck(teacher))
        loss = cosine_distillation_loss(teacher, student, kind=self.loss_type)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch), sync_dist=True)
        return loss
