"""Decision thresholds from normal images the model was not trained on.

At the end of ``fit``, :class:`NormalThresholds` runs the trained model (eval mode, no grad) over
the datamodule's held-out normal training images (``data.holdout_fraction``,
:meth:`kdad.data.AnomalyDataModule.holdout_dataloader`) and sets

    model.normal_thresholds = {"image": float, "pixel": float, "fpr": float,
                               "source": "holdout of N train/good images", "holdout_images": N}

then writes the last checkpoint again, so the stored checkpoint carries them
(``checkpoint["kdad"]["thresholds"]``; ``kdad.checkpoint.load_model`` restores them and
``kdad-predict`` uses them by default).

Threshold at a false-positive rate ``fpr`` (:func:`fpr_threshold`): the smallest held-out value
``t`` such that at most ``fpr`` of the held-out values are *above* ``t``, i.e. the
``ceil(n * (1 - fpr))``-th smallest of the ``n`` values (``numpy.quantile(values, 1 - fpr,
method="inverted_cdf")``). A decision "anomalous if value > t" then flags at most ``fpr`` of the
held-out normal data. The image threshold uses the held-out images' scores; the pixel threshold
all held-out pixels' anomaly-map values (at the model's input size). With fewer than ``1 / fpr``
held-out images the image threshold is their maximum score.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch

from kdad.data.batch import Batch
from kdad.errors import KdadError

log = logging.getLogger(__name__)


def fpr_threshold(values: np.ndarray, fpr: float) -> float:
    """The smallest of ``values`` with at most a share ``fpr`` of ``values`` strictly above it:
    the ``ceil(n * (1 - fpr))``-th smallest value (NumPy's ``inverted_cdf`` quantile at
    ``1 - fpr``). Linear time (``np.partition``), for the millions of pixels of a hold-out set."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        raise ValueError("fpr_threshold needs at least one value")
    if not 0.0 < fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {fpr}")
    rank = max(1, math.ceil(round(flat.size * (1.0 - fpr), 9)))  # 1-based; round: float fuzz
    return float(np.partition(flat, rank - 1)[rank - 1])


@torch.no_grad()
def holdout_outputs(model: Any, batches: Iterable[Batch], forward_context: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Run ``model`` (eval mode, no grad) over ``batches``: ``(scores float32 [N],
    anomaly-map values float32 [N*H*W])``. ``forward_context`` (e.g. the trainer's precision
    plugin's ``forward_context``) wraps each forward pass, as in the test loop. The model's
    training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    scores: list[np.ndarray] = []
    pixels: list[np.ndarray] = []
    try:
        for batch in batches:
            images = batch.image.to(model.device)
            if forward_context is not None:
                with forward_context():
                    output = model(images)
            else:
                output = model(images)
            scores.append(output.score.float().cpu().numpy().ravel())
            pixels.append(output.anomaly_map.float().cpu().numpy().ravel())
    finally:
        model.train(was_training)
    return np.concatenate(scores), np.concatenate(pixels)


class NormalThresholds(L.Callback):
    """Set ``model.normal_thresholds`` from the held-out normal images at the end of ``fit``
    and re-save the last checkpoint with them.

    Args:
        fpr: the false-positive rate on held-out normal data that the image and the pixel
            thresholds allow (0.01: the 99th percentile, :func:`fpr_threshold`).

    Without held-out images (``data.holdout_fraction=0``, e.g. the paper presets) nothing is
    stored and a warning says that ``kdad-predict`` will need ``threshold=<score>``.
    """

    def __init__(self, fpr: float = 0.01) -> None:
        if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0.0 < float(fpr) < 1.0:
            raise KdadError(f"invalid callbacks.normal_thresholds.fpr={fpr!r}; use a rate in (0, 1), e.g. 0.01")
        self.fpr = float(fpr)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "holdout_dataloader"):
            log.warning("no kdad datamodule: no normal-data thresholds are stored")
            return
        count = int(datamodule.num_holdout)
        if count == 0:
            log.warning(
                "data.holdout_fraction=0: no normal-data thresholds are stored in the checkpoint; "
                "kdad-predict will need threshold=<score> (set data.holdout_fraction=0.1 to store them)"
            )
            return
        context = getattr(trainer.precision_plugin, "forward_context", None)
        scores, pixels = holdout_outputs(pl_module, datamodule.holdout_dataloader(), context)
        thresholds = {
            "image": fpr_threshold(scores, self.fpr),
            "pixel": fpr_threshold(pixels, self.fpr),
            "fpr": self.fpr,
            "source": f"holdout of {count} train/good images",
            "holdout_images": count,
        }
        pl_module.normal_thresholds = thresholds
        log.info(
            "normal-data thresholds at FPR %g from %d held-out images: image score > %.6g, pixel > %.6g",
            self.fpr,
            count,
            thresholds["image"],
            thresholds["pixel"],
        )
        if count < math.ceil(1.0 / self.fpr):
            log.info("fewer than 1/fpr held-out images: the image threshold is their maximum score")
        self._resave(trainer)

    @staticmethod
    def _resave(trainer: L.Trainer) -> None:
        """Write the checkpoint callbacks' latest file again, now with the thresholds: the
        ``last`` file, or without ``monitor`` the (only) ``best`` file, and only when it holds the
        current weights (saved at this global step), so a metric-selected or older file is never
        overwritten. Every process calls ``save_checkpoint`` (it synchronises under DDP); rank 0
        writes. Resuming from the file works as before."""
        saved: set[str] = set()
        for callback in trainer.checkpoint_callbacks:
            path = callback.last_model_path or (
                callback.best_model_path if getattr(callback, "monitor", None) is None else ""
            )
            if not path or path in saved:
                continue
            step = getattr(callback, "_last_global_step_saved", trainer.global_step)
            if step != trainer.global_step:
                log.warning(
                    "checkpoint %s is from step %s, the model from step %s: not re-saved, it holds no thresholds",
                    path,
                    step,
                    trainer.global_step,
                )
                continue
            trainer.save_checkpoint(path, weights_only=bool(getattr(callback, "save_weights_only", False)))
            saved.add(path)
            log.info("checkpoint %s re-saved with the normal-data thresholds", path)
