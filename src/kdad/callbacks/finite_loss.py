"""Non-finite training losses never train silently.

:class:`NonFiniteLossGuard` looks at every loss that reaches ``backward`` (Lightning's
``on_before_backward``: automatic optimisation and every ``manual_backward`` alike) and, when it
holds a NaN or an Inf, either

* ``mode="error"`` (default): stops the run with a one-line :class:`~kdad.errors.KdadError`
  naming the global step, the epoch, the batch and the logged loss terms (``train/...``) that
  are non-finite (``loss`` when no term was logged before ``backward``), or
* ``mode="skip"``: drops the gradients before the optimiser step, so the step leaves weights
  and optimiser state (e.g. Adam's moments) unchanged, puts the module's buffers (BatchNorm
  running statistics, which the batch's forward pass may have filled with NaN) back to their
  values at the start of the batch, and logs a warning with the running count. Lightning's step
  counter and LR schedule still advance, as for any other step. An epoch in which *every*
  optimiser step was skipped stops the run (the model has diverged; skipping cannot recover).

Manual optimisation (URD: teacher step, then student step in one batch): a non-finite loss
skips its own optimiser step and every later step of the same batch; an earlier step of the
batch, computed from a finite loss, has already happened. Under gradient accumulation the whole
accumulated step is skipped. Under DDP the decision is reduced over processes (the gradients
were averaged, so every process skips, or stops, together).

Every :class:`~kdad.methods.base.AnomalyModule` adds a guard in ``mode="error"`` when the
trainer has none (``callbacks=none``), so this check is always on; the ``callbacks`` configs
set it as ``finite_loss`` (``callbacks.finite_loss.mode=skip``).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

from kdad.errors import KdadError, check_choice

log = logging.getLogger(__name__)

#: The values of ``mode``.
NONFINITE_MODES: tuple[str, ...] = ("error", "skip")


class NonFiniteLossGuard(L.Callback):
    """Stop (``mode="error"``) or skip the optimiser step (``mode="skip"``) on a NaN/Inf loss.

    Attributes:
        skipped_steps: optimiser steps skipped so far (``mode="skip"``).
    """

    def __init__(self, mode: str = "error") -> None:
        check_choice("callbacks.finite_loss.mode", mode, NONFINITE_MODES)
        self.mode = mode
        self.skipped_steps = 0
        self._pending: str | None = None  # the first non-finite loss not yet acted upon
        self._batch_idx = -1
        self._backward_in_batch = 0
        self._epoch_nonfinite: set[str] = set()  # epoch-only logged terms already non-finite
        self._buffers: list[Tensor] | None = None  # skip mode: the module's buffers at batch start
        self._epoch_steps = 0
        self._epoch_skipped = 0

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_nonfinite.clear()
        self._epoch_steps = self._epoch_skipped = 0

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_steps and self._epoch_skipped == self._epoch_steps:
            raise KdadError(
                f"every one of the {self._epoch_steps} optimiser steps of epoch {trainer.current_epoch} was skipped "
                "for a non-finite training loss: the model has diverged and skipping cannot recover; "
                "lower the learning rate or check the training images"
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx
        self._backward_in_batch = 0
        if not pl_module.automatic_optimization:
            self._pending = None  # manual: a non-finite loss skips the rest of its batch only
        if self.mode == "skip":
            self._buffers = [buffer.detach().clone() for buffer in pl_module.buffers()]

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._backward_in_batch += 1
        if bool(torch.isfinite(loss.detach()).all()):
            return
        where = f"global step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx}"
        if not pl_module.automatic_optimization:
            where += f", backward pass {self._backward_in_batch} of the batch"
        description = f"non-finite training loss at {where}): {self._terms(trainer, pl_module, loss)}"
        if self._pending is None:
            self._pending = description
        if self.mode == "error" and trainer.world_size == 1:
            raise KdadError(f"{description}; {_ADVICE}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._epoch_steps += 1
        local = self._pending is not None
        anywhere = trainer.strategy.reduce_boolean_decision(local, all=False) if trainer.world_size > 1 else local
        if not anywhere:
            return
        description = self._pending or (
            f"non-finite training loss on another process at global step {trainer.global_step} "
            f"(epoch {trainer.current_epoch})"
        )
        if self.mode == "error":
            raise KdadError(f"{description}; {_ADVICE}")
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # optimisers skip parameters without gradients entirely
        if self._buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(pl_module.buffers(), self._buffers):
                    buffer.copy_(saved)
        self.skipped_steps += 1
        self._epoch_skipped += 1
        log.warning(
            "%s: optimiser step skipped (callbacks.finite_loss.mode=skip; %d skipped so far)",
            description,
            self.skipped_steps,
        )
        if pl_module.automatic_optimization:
            self._pending = None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped_steps:
            log.warning("%d optimiser step(s) were skipped because of non-finite training losses", self.skipped_steps)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    # ------------------------------------------------------------------ naming the terms
    def _terms(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> str:
        """``"train/loss_seg=nan, train/loss=nan"``: the ``train/`` values this step logged
        that are non-finite, or ``"loss=<value>"`` when none is known (nothing logged before
        backward, e.g. manual optimisation, or Lightning internals changed)."""
        named = _nonfinite_logged(trainer, self._epoch_nonfinite) if pl_module.automatic_optimization else []
        if not named:
            return f"loss={_value(loss)}"
        named.sort(key=lambda item: item[0] == "train/loss")  # the terms first, the total last
        return ", ".join(f"{name}={value}" for name, value in named)

    def __repr__(self) -> str:
        return f"NonFiniteLossGuard(mode={self.mode!r})"


_ADVICE = (
    "training stopped: lower the learning rate, check the training images, or set "
    "callbacks.finite_loss.mode=skip to skip such batches"
)


def _value(tensor: Tensor) -> str:
    values = tensor.detach().float().flatten()
    bad = values[~torch.isfinite(values)]
    return f"{float(bad[0] if bad.numel() else values[0]):g}"


def _nonfinite_logged(trainer: L.Trainer, epoch_seen: set[str]) -> list[tuple[str, str]]:
    """Non-finite ``train/`` values logged by this training step (Lightning's result store).

    Values logged ``on_step`` are this step's; values logged only ``on_epoch`` are running
    sums, so they are named only when they turn non-finite (``epoch_seen`` remembers them).
    Any surprise in Lightning's private store gives ``[]`` (the caller then names ``loss``).
    """
    try:
        results = trainer._results
        if results is None:
            return []
        found = []
        for metric in results.values():
            meta = metric.meta
            if meta.fx != "training_step" or not meta.name.startswith("train/") or not metric.is_tensor:
                continue
            if meta.on_step:
                value = metric._forward_cache
            elif meta.name not in epoch_seen:
                value = metric.value
            else:
                continue
            if not isinstance(value, Tensor) or bool(torch.isfinite(value).all()):
                continue
            if not meta.on_step:
                epoch_seen.add(meta.name)
            found.append((meta.name, _value(value)))
        return found
    except Exception:  # noqa: BLE001 - a private API: fall back to naming "loss"
        return []


__all__ = ["NONFINITE_MODES", "NonFiniteLossGuard"]
