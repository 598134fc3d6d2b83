"""Inference speed-ups applied when testing or predicting (issue 8): see
:meth:`kdad.methods.base.AnomalyModule.optimize_for_inference` and experiments/bench."""

from __future__ import annotations

import lightning as L

from kdad.methods.base import AnomalyModule


class InferenceOptimization(L.Callback):
    """Convert the model for evaluation at the start of ``trainer.test`` / ``trainer.predict``.

    Args:
        channels_last: NHWC weights and inputs (default on: faster on CPU and GPU, same maps up
            to float rounding; measured in experiments/bench/README.md).
        compile: ``torch.compile`` the networks (inductor, freezing). Off by default: compiling
            takes minutes on a CPU and pays only on large test sets.
    """

    def __init__(self, channels_last: bool = True, compile: bool = False) -> None:
        self.channels_last = channels_last
        self.compile = compile
        self._done = False

    def _apply(self, pl_module: L.LightningModule) -> None:
        if self._done or not isinstance(pl_module, AnomalyModule):
            return
        pl_module.optimize_for_inference(channels_last=self.channels_last, compile=self.compile)
        self._done = True

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)
