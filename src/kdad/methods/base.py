"""The shared LightningModule of every kdad method (DESIGN §3).

What lives here, once for all methods:
- input normalisation on the device (images arrive as uint8 RGB, or float in [0, 1]);
- frozen modules (teachers, experts) that stay in eval mode with no grad for the whole run,
  whatever Lightning does with ``model.train()`` at epoch starts;
- the anomaly map from teacher/student feature pyramids (per-level 1 - cos, bilinear
  upsampling with ``align_corners=True``, add/mul fusion, Gaussian sigma 4, score = max), in
  float32 even under mixed precision;
- validation (labelled *monitoring*, never used to select a checkpoint), test and predict steps,
  metric accumulation and computation once at the end;
- optimiser wiring from Hydra partials (``_partial_: true``), with the paper default otherwise,
  and the learning rate logged as ``train/lr`` (every optimiser and parameter group);
- mixed precision (``trainer.precision=bf16-mixed`` / ``16-mixed``): networks run under
  Lightning's autocast, while ``forward`` always returns float32 maps and scores and a training
  loss that is not float32 is refused (:meth:`on_before_backward`).

A method implements ``teacher_student_features(x)`` (or overrides ``anomaly_output``) and
``training_step``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

import kdad
from kdad.data.batch import Batch
from kdad.errors import KdadError
from kdad.feature_cache import GIB, FeatureCache
from kdad.metrics import AnomalyMetrics
from kdad.postprocess import AnomalyMapper

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FORMAT = 1

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]


def _plain(value: Any) -> Any:
    """JSON-representable copy of hyper-parameters (tuples -> lists, other objects -> str)."""
    return json.loads(json.dumps(value, default=str))


class AnomalyOutput(NamedTuple):
    """What every method's ``forward`` returns (a NamedTuple so tracing/export keeps it)."""

    anomaly_map: Tensor  # [B,1,H,W] float32, smoothed
    score: Tensor  # [B] float32, image anomaly score


class AnomalyModule(L.LightningModule):
    """Base class for teacher-student anomaly detectors.

    Args:
        anomaly_map: options of :class:`kdad.postprocess.AnomalyMapper`
            (``mode``: add|mul, ``align_corners``, ``sigma``, ``truncate``).
        optimizer: a factory ``f(params) -> Optimizer`` (Hydra ``_partial_``); ``None`` means
            the method's paper default (:meth:`default_optimizer`).
        scheduler: optional factory ``f(optimizer) -> LRScheduler``.
        metrics: options of :class:`kdad.metrics.AnomalyMetrics` (``fpr_limit``, ``legacy_pro``).
        calibrate_frozen_bn: before training, re-estimate the frozen modules' BatchNorm
            statistics from the training images (:meth:`calibrate_frozen_batchnorm`). Not part of
            any paper; only useful for randomly initialised teachers. ``"if_random"`` calibrates
            only when every frozen module was randomly initialised (the demo). Default off.
    """

    #: short name used in results.json and checkpoints (set by subclasses)
    method_name: str = "base"
    #: input height and width must be multiples of this (e.g. 32 for RD's bottleneck)
    input_multiple: int = 1
    #: methods that train on synthetic anomalies need ``data.synthesis`` (batches then carry
    #: ``aug_image``/``aug_mask``; see :mod:`kdad.data.synthesis`)
    requires_synthesis: bool = False
    #: True when some training backward pass leaves trainable parameters without gradients
    #: (DDP must then find unused parameters; kdad-train switches the strategy)
    ddp_unused_parameters: bool = False

    def __init__(
        self,
        anomaly_map: dict[str, Any] | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        metrics: dict[str, Any] | None = None,
        calibrate_frozen_bn: bool | str = False,
    ) -> None:
        super().__init__()
        if calibrate_frozen_bn not in (True, False, "if_random"):
            raise KdadError(f"method.calibrate_frozen_bn={calibrate_frozen_bn!r}; use true, false or if_random")
        self.calibrate_frozen_bn = calibrate_frozen_bn
        self.frozen_bn_calibrated = False
        self._frozen: list[str] = []
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.mapper = AnomalyMapper(**dict(anomaly_map or {}))
        self.metric_options = dict(metrics or {})
        self.test_metrics = AnomalyMetrics(**self.metric_options)
        self.val_metrics = AnomalyMetrics(**self.metric_options)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.test_results: dict[str, float] = {}
        #: per-image cache of a frozen teacher's training features (methods enable it, see
        #: :meth:`frozen_features`)
        self.feature_cache: FeatureCache | None = None
        #: NHWC inputs in ``forward`` (set by :meth:`optimize_for_inference`)
        self.inference_channels_last = False
        self.inference_seconds = 0.0
        self.inference_images = 0

    # ------------------------------------------------------------------ frozen modules
    def freeze(self, name: str) -> None:
        """Mark the sub-module ``name`` as frozen: eval mode and no grad for the whole run."""
        module: nn.Module = getattr(self, name)
        module.eval()
        module.requires_grad_(False)
        if name not in self._frozen:
            self._frozen.append(name)

    def enable_feature_cache(self, enabled: bool, max_gib: float) -> None:
        """Cache the frozen teacher's features of clean training images across epochs
        (:class:`kdad.feature_cache.FeatureCache`); for methods whose teacher input never changes."""
        if max_gib < 0:
            raise KdadError(f"method.cache_teacher_max_gib={max_gib}; use a size in GiB >= 0")
        self.feature_cache = FeatureCache(int(max_gib * GIB)) if enabled else None

    def frozen_features(self, module: nn.Module, x: Tensor, keys: Sequence[str] = ()) -> list[Tensor]:
        """``module(x)`` without grad, for a frozen module fed clean training images; served per
        image (keyed by ``Batch.path``) from the feature cache when the method enabled it."""
        with torch.no_grad():
            if self.feature_cache is None or not keys:
                return module(x)
            return self.feature_cache(keys, x, module)

    @property
    def frozen_modules(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self._frozen]

    def train(self, mode: bool = True) -> AnomalyModule:
        """Lightning calls ``train()`` at every epoch start; frozen modules stay in eval."""
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()
        return self

    # ------------------------------------------------------------------ inputs and outputs
    def normalize(self, images: Tensor) -> Tensor:
        """uint8 [B,3,H,W] (or float in [0,1]) RGB -> ImageNet-normalised float."""
        height, width = images.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise KdadError(
                f"{self.method_name} needs image sizes that are multiples of {self.input_multiple}, got "
                f"{height}x{width}; set data.image_size to e.g. "
                f"{max(self.input_multiple, round(height / self.input_multiple) * self.input_multiple)}"
            )
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.pixel_mean) / self.pixel_std

    def synthetic_view(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """The batch's synthetic-anomaly view: ``(normalised aug_image, aug_mask [B,1,H,W])``."""
        if batch.aug_image is None or batch.aug_mask is None:
            raise KdadError(
                f"{self.method_name} trains on synthetic anomalies but the training batch has none; "
                "set data.synthesis (the method's config sets it: was it overridden with null?)"
            )
        return self.normalize(batch.aug_image), batch.aug_mask.float()

    def teacher_student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Feature pyramids compared by the anomaly map (normalised input)."""
        raise NotImplementedError

    def anomaly_output(self, x: Tensor) -> AnomalyOutput:
        """Anomaly map and score from normalised images (override for non-KD maps)."""
        teacher, student = self.teacher_student_features(x)
        anomaly_map, score = self.mapper(teacher, student, tuple(x.shape[-2:]))
        return AnomalyOutput(anomaly_map, score)

    def forward(self, images: Tensor) -> AnomalyOutput:
        """Un-normalised images (uint8 or [0,1] float) -> ``AnomalyOutput`` (use in eval mode).

        Maps and scores are float32 whatever the autocast precision of the networks."""
        x = self.normalize(images)
        if self.inference_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        output = self.anomaly_output(x)
        return AnomalyOutput(output.anomaly_map.float(), output.score.float())

    def optimize_for_inference(self, channels_last: bool = True, compile: bool = False) -> AnomalyModule:
        """Speed-ups for evaluation and prediction only (issue 8; measured in experiments/bench).

        ``channels_last``: NHWC weights and inputs (oneDNN/cuDNN's preferred layout; same maps up
        to float rounding). ``compile``: ``torch.compile`` each network (inductor with
        ``freezing``: constant-folded BatchNorm and pre-packed weights); costs minutes of
        compilation on a CPU, so it pays on large test sets. Call after training: the networks
        stay converted."""
        if channels_last:
            self.to(memory_format=torch.channels_last)
            self.inference_channels_last = True
        if compile:
            for name, child in self.named_children():
                if isinstance(child, Metric) or not any(True for _ in child.parameters()):
                    continue
                child.compile(options={"freezing": True})
                log.info("compiled %s for inference (the first batch pays the compilation)", name)
        return self

    # ------------------------------------------------------------------ evaluation
    def _timed_forward(self, images: Tensor) -> AnomalyOutput:
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        start = time.perf_counter()
        output = self(images)
        if images.is_cuda:
            torch.cuda.synchronize(images.device)
        self.inference_seconds += time.perf_counter() - start
        self.inference_images += int(images.shape[0])
        return output

    @staticmethod
    def maps_at_mask_resolution(anomaly_map: Tensor, mask: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        """Resize maps to the masks' resolution (only differs for native-resolution evaluation)."""
        if isinstance(mask, Tensor):
            if mask.shape[-2:] == anomaly_map.shape[-2:]:
                return anomaly_map
            return F.interpolate(anomaly_map, size=mask.shape[-2:], mode="bilinear", align_corners=False)
        return [
            F.interpolate(m[None], size=t.shape[-2:], mode="bilinear", align_corners=False)[0]
            for m, t in zip(anomaly_map, mask)
        ]

    def _evaluate_batch(self, batch: Batch, metric: AnomalyMetrics) -> dict[str, Any]:
        output = self._timed_forward(batch.image)
        if metric.pixel:
            maps = self.maps_at_mask_resolution(output.anomaly_map, batch.mask)
            metric.update(output.score, batch.label, maps, batch.mask)
        else:
            metric.update(output.score, batch.label)
        return {"anomaly_map": output.anomaly_map, "score": output.score}

    def _metrics_for_current_data(self, metric: AnomalyMetrics) -> AnomalyMetrics:
        """Image-only metrics when the test set has anomalous images without masks."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        has_masks = bool(getattr(datamodule, "has_masks", True))
        if metric.pixel == has_masks:
            return metric
        if not has_masks:
            log.warning("the test set has anomalous images without masks: pixel metrics are skipped")
        return AnomalyMetrics(**{**self.metric_options, "pixel": has_masks}).to(self.device)

    def on_test_epoch_start(self) -> None:
        self.test_metrics = self._metrics_for_current_data(self.test_metrics)
        self.test_metrics.reset()
        self.inference_seconds = 0.0
        self.inference_images = 0

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate_batch(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_results = {k: float(v) for k, v in self.test_metrics.compute().items()}
        self.test_curves = self.test_metrics.curves  # ROC/PR/PRO + test-set F1 thresholds (kdad.metrics.curves)
        self.log_dict({f"test/{k}": v for k, v in self.test_results.items()}, sync_dist=False)
        self.test_metrics.reset()

    def on_validation_epoch_start(self) -> None:
        self.val_metrics = self._metrics_for_current_data(self.val_metrics)
        self.val_metrics.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Periodic evaluation for *monitoring* only: never used to pick a checkpoint."""
        return self._evaluate_batch(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        self.log_dict({f"monitor/{k}": float(v) for k, v in values.items()})
        self.val_metrics.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        output = self(batch.image)
        return {"anomaly_map": output.anomaly_map, "score": output.score, "path": batch.path}

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> Iterable[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def default_optimizer(self) -> OptimizerFactory:
        """The paper's optimiser; subclasses override."""
        return partial(torch.optim.Adam, lr=1e-3)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Log the learning rate (``train/lr``; ``train/lr_<optimizer>_<group>`` when there are
        several) at every logged step, so schedulers show up next to the loss."""
        if self._trainer is None:
            return
        rates = [
            (i, j, float(group["lr"]))
            for i, optimizer in enumerate(self.trainer.optimizers)
            for j, group in enumerate(optimizer.param_groups)
        ]
        for i, j, lr in rates:
            name = "train/lr" if len(rates) == 1 else f"train/lr_{i}_{j}"
            self.log(name, lr, on_step=True, on_epoch=False, batch_size=len(batch) if hasattr(batch, "__len__") else 1)

    def on_before_backward(self, loss: Tensor) -> None:
        """Losses are float32 (or float64), also under mixed precision: a method that returns a
        bf16/fp16 loss loses precision in its gradients (cast features with ``.float()`` first)."""
        if loss.dtype in (torch.float16, torch.bfloat16):
            raise RuntimeError(f"{self.method_name}: the training loss is {loss.dtype}; compute losses in float32")

    def configure_callbacks(self) -> list[L.Callback]:
        """A NaN/Inf training loss never trains silently: a
        :class:`~kdad.callbacks.finite_loss.NonFiniteLossGuard` (``mode="error"``) joins the
        trainer unless it has one already (``callbacks.finite_loss``, e.g. ``mode=skip``)."""
        # imported lazily: the kdad.callbacks package loads plotting code
        from kdad.callbacks.finite_loss import NonFiniteLossGuard

        callbacks = self.trainer.callbacks if self._trainer is not None else []
        return [] if any(isinstance(cb, NonFiniteLossGuard) for cb in callbacks) else [NonFiniteLossGuard()]

    def configure_optimizers(self) -> Any:
        factory = self.optimizer_factory or self.default_optimizer()
        optimizer = factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer)}}

    def planned_epochs(self, batches_per_epoch: int, category: str) -> int | None:
        """Whole epochs to train for methods whose recipe counts iterations (e.g. URD's 5,000),
        given the training batches per epoch and process; ``None`` keeps trainer.max_epochs."""
        return None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what is needed to rebuild this model safely (plain JSON types only, so the
        checkpoint loads with ``torch.load(weights_only=True)``)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint["kdad"] = {
            "format": CHECKPOINT_FORMAT,
            "version": kdad.__version__,
            "method": self.method_name,
            "hparams": _plain(dict(self.hparams)),
            "datamodule": _plain(dict(datamodule.hparams)) if datamodule is not None else None,
            "thresholds": _plain(getattr(self, "normal_thresholds", None)),  # kdad.callbacks.NormalThresholds
        }

    # ------------------------------------------------------------------ bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        frozen = sum(p.numel() for m in self.frozen_modules for p in m.parameters())
        return {"trainable": trainable, "frozen": frozen}

    def _should_calibrate(self) -> bool:
        if self.calibrate_frozen_bn == "if_random":
            sources = [str(getattr(m, "weights_source", "")) for m in self.frozen_modules]
            return bool(sources) and all(source.startswith("none") for source in sources)
        return bool(self.calibrate_frozen_bn)

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.requires_synthesis and datamodule is not None and getattr(datamodule, "synthesis", None) is None:
            raise KdadError(
                f"{self.method_name} trains on synthetic anomalies: set data.synthesis "
                "(the method's config sets it: was it overridden with null?)"
            )
        if (
            self._should_calibrate()
            and datamodule is not None
            and self.trainer.ckpt_path is None
            and self.trainer.global_step == 0
        ):
            seen = self.calibrate_frozen_batchnorm(datamodule.train_dataloader())
            self.frozen_bn_calibrated = True
            log.warning(
                "calibrated the frozen modules' BatchNorm statistics on %d training images (not part of the paper)",
                seen,
            )
        if self.feature_cache is not None:
            self.feature_cache.clear()

    def on_fit_end(self) -> None:
        cache = self.feature_cache
        if cache is not None and cache.hits + cache.misses:
            log.info(
                "teacher-feature cache: %d images, %.2f GiB, %d of %d teacher forwards saved",
                len(cache),
                cache.bytes / GIB,
                cache.hits,
                cache.hits + cache.misses,
            )
        if cache is not None:
            cache.clear()  # free the memory before testing

    @torch.no_grad()
    def calibrate_frozen_batchnorm(self, loader: Iterable[Batch], max_batches: int | None = None) -> int:
        """Set the frozen modules' BatchNorm running statistics from training images.

        One no-grad pass with cumulative averaging (momentum=None). Only meant for teachers
        without pretrained weights (random init): with ImageNet weights it changes the method.
        Returns the number of images seen.
        """
        norms = [
            m
            for module in self.frozen_modules
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if not norms:
            return 0
        saved_momentum = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        try:
            for index, batch in enumerate(loader):
                if max_batches is not None and index >= max_batches:
                    break
                x = self.normalize(batch.image.to(self.device))
                for module in self.frozen_modules:
                    module(x)
                seen += int(x.shape[0])
        finally:
            for m, momentum in zip(norms, saved_momentum):
                m.momentum = momentum
            for module in self.frozen_modules:
                module.eval()
        return seen
