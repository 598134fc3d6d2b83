"""A NaN/Inf training loss stops the run with a one-line KdadError (step, epoch, term) or, with
``callbacks.finite_loss.mode=skip``, skips the batch: weights, optimiser state and BatchNorm
statistics after the bad batch equal those before it. Tiny in-process runs (resnet18, no
weights, 32 px)."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kdad.callbacks import NonFiniteLossGuard
from kdad.data.batch import Batch
from kdad.errors import KdadError
from kdad.losses import cosine_distillation_loss
from kdad.methods import ReverseDistillation

SIZE = 32
BATCH = 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Tiny models run faster on one thread than on two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _loader(n_batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_batches * BATCH, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    items = [
        Batch(
            image=images[i : i + 1],
            label=torch.zeros(1, dtype=torch.long),
            mask=torch.zeros(1, 1, SIZE, SIZE),
            path=[f"{i}.png"],
        )
        for i in range(len(images))
    ]

    def collate(batch: list[Batch]) -> Batch:
        return Batch(
            image=torch.cat([b.image for b in batch]),
            label=torch.cat([b.label for b in batch]),
            mask=torch.cat([b.mask for b in batch]),
            path=[p for b in batch for p in b.path],
        )  # type: ignore[list-item]

    return DataLoader(items, batch_size=BATCH, collate_fn=collate, shuffle=False)


def _trainer(tmp_path: Any, callbacks: list[L.Callback], steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )


def _poison_bottleneck(model: ReverseDistillation, at_step: int, value: float) -> None:
    """From the ``at_step``-th training forward on (0-based, that batch only), the bottleneck's
    output is multiplied by ``value`` (NaN or Inf): the decoder's BatchNorm sees it, the loss is
    non-finite, the way real numerical blow-ups look."""
    calls = {"n": 0}

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        if not module.training:
            return None
        calls["n"] += 1
        return output * value if calls["n"] - 1 == at_step else None

    model.bottleneck.register_forward_hook(hook)


class _Snapshots(L.Callback):
    """The module's whole state (parameters and buffers) before and after every training batch,
    and Adam's step count of the first trainable parameter."""

    def __init__(self) -> None:
        self.before: list[dict[str, Tensor]] = []
        self.after: list[dict[str, Tensor]] = []
        self.adam_steps: list[float] = []

    @staticmethod
    def _state(module: L.LightningModule) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.before.append(self._state(pl_module))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.after.append(self._state(pl_module))
        optimizer = trainer.optimizers[0]
        first = next(p for g in optimizer.param_groups for p in g["params"])
        self.adam_steps.append(float(optimizer.state.get(first, {}).get("step", 0)))


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ error mode
def test_nonfinite_loss_stops_with_step_epoch_and_term(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = ReverseDistillation(backbone="resnet18", weights="none")
    _poison_bottleneck(model, at_step=2, value=math.nan)
    snapshots = _Snapshots()
    trainer = _trainer(tmp_path, [snapshots], steps=4)  # no guard given: the base adds one (error)
    with pytest.raises(KdadError) as info:
        trainer.fit(model, train_dataloaders=_loader(4))
    message = str(info.value)
    assert "\n" not in message
    assert "global step 2 " in message and "epoch 0" in message and "batch 2" in message
    assert "train/loss=nan" in message  # the total is RD's only logged term
    assert "mode=skip" in message
    assert len(snapshots.before) == 3 and len(snapshots.after) == 2  # stopped inside batch 2
    assert snapshots.adam_steps == [1.0, 2.0]  # no optimiser step after the bad loss
    assert all(torch.isfinite(p).all() for p in model.parameters())


class _TwoTermRD(ReverseDistillation):
    """RD with the loss split into two logged terms (``loss_a`` per step, ``loss_b`` per step,
    ``loss_c`` per epoch only, like ADPS' terms); ``bad`` (term, step) makes one term non-finite."""

    bad: tuple[str, int, float] = ("loss_b", 1, math.nan)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        teacher, student = self.teacher_student_features(self.normalize(batch.image))
        total = cosine_distillation_loss([t.detach() for t in teacher], student)
        name, step, value = self.bad
        terms = {"loss_a": total * 0.5, "loss_b": total * 0.25, "loss_c": total * 0.25}
        if batch_idx == step:
            terms[name] = terms[name] * value
        self.log("train/loss_a", terms["loss_a"], on_step=True, on_epoch=True, batch_size=len(batch))
        self.log("train/loss_b", terms["loss_b"], on_step=True, on_epoch=True, batch_size=len(batch))
        self.log("train/loss_c", terms["loss_c"], on_step=False, on_epoch=True, batch_size=len(batch))
        loss = terms["loss_a"] + terms["loss_b"] + terms["loss_c"]
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=len(batch))
        return loss


@pytest.mark.parametrize(("term", "value", "shown"), [("loss_b", math.nan, "nan"), ("loss_c", math.inf, "inf")])
def test_multi_term_loss_names_the_nonfinite_term(tmp_path: Any, term: str, value: float, shown: str) -> None:
    torch.manual_seed(0)
    model = _TwoTermRD(backbone="resnet18", weights="none")
    model.bad = (term, 1, value)
    trainer = _trainer(tmp_path, [NonFiniteLossGuard(mode="error")], steps=3)
    with pytest.raises(KdadError) as info:
        trainer.fit(model, train_dataloaders=_loader(3))
    message = str(info.value)
    assert "global step 1 " in message and "epoch 0" in message
    assert f"train/{term}={shown}" in message and f"train/loss={shown}" in message
    assert "train/loss_a" not in message
    assert message.index(f"train/{term}") < message.index("train/loss=")  # the term first, then the total


# ------------------------------------------------------------------------------ skip mode
def test_skip_leaves_weights_optimiser_and_batchnorm_unchanged(tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = ReverseDistillation(backbone="resnet18", weights="none")
    _poison_bottleneck(model, at_step=2, value=math.nan)
    snapshots, guard = _Snapshots(), NonFiniteLossGuard(mode="skip")
    trainer = _trainer(tmp_path, [snapshots, guard], steps=4)
    with caplog.at_level("WARNING", logger="kdad.callbacks.finite_loss"):
        trainer.fit(model, train_dataloaders=_loader(4))
    assert len(snapshots.after) == 4
    assert _equal(snapshots.before[2], snapshots.after[2])  # the NaN batch changed nothing
    for k in (1, 3):  # the batches around it did train, BatchNorm statistics included
        assert not _equal(snapshots.before[k], snapshots.after[k])
        key = "decoder.layer1.0.bn1.running_mean"
        assert not torch.equal(snapshots.before[k][key], snapshots.after[k][key])
    assert snapshots.adam_steps == [1.0, 2.0, 2.0, 3.0]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())
    assert guard.skipped_steps == 1
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert any("global step 2 " in w and "1 skipped so far" in w for w in warnings)


class _TwoOptimisers(L.LightningModule):
    """Manual optimisation like URD: step 'first' on loss 1, then 'second' on loss 2 (one batch)."""

    def __init__(self, bad: dict[int, int]) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 1)
        self.bad = bad  # batch index -> backward pass (1 or 2) whose loss is NaN

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        opt_first, opt_second = self.optimizers()  # type: ignore[misc]
        for index, (module, opt) in enumerate(((self.first, opt_first), (self.second, opt_second)), start=1):
            x = self.first(batch) if module is self.second else batch
            loss = module(x.detach()).pow(2).mean()
            if self.bad.get(batch_idx) == index:
                loss = loss * math.nan
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.first.parameters(), lr=0.1), torch.optim.Adam(self.second.parameters(), lr=0.1)]


def _manual_run(tmp_path: Any, bad: dict[int, int], mode: str) -> tuple[_TwoOptimisers, _Snapshots]:
    torch.manual_seed(0)
    model, snapshots = _TwoOptimisers(bad), _Snapshots()
    data = DataLoader(torch.randn(8, 4), batch_size=2)
    _trainer(tmp_path, [snapshots, NonFiniteLossGuard(mode=mode)], steps=100).fit(model, train_dataloaders=data)
    return model, snapshots


def test_manual_optimisation_skip_and_error(tmp_path: Any) -> None:
    # batch 1: the first loss is NaN -> both steps of the batch are skipped
    # batch 2: the second loss is NaN -> the first step (finite loss) happens, the second does not
    model, snap = _manual_run(tmp_path, {1: 1, 2: 2}, "skip")
    first = [k for k in snap.before[0] if k.startswith("first.")]
    second = [k for k in snap.before[0] if k.startswith("second.")]

    def changed(k: int, keys: list[str]) -> bool:
        return not all(torch.equal(snap.before[k][n], snap.after[k][n]) for n in keys)

    assert [changed(k, first) for k in range(4)] == [True, False, True, True]
    assert [changed(k, second) for k in range(4)] == [True, False, False, True]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with pytest.raises(
        KdadError, match=r"global step \d+ \(epoch 0, batch 2, backward pass 2 of the batch\): loss=nan"
    ):
        _manual_run(tmp_path, {2: 2}, "error")

    # skipping every step of an epoch cannot recover: the run stops
    with pytest.raises(KdadError, match="every one of the 8 optimiser steps of epoch 0 was skipped"):
        _manual_run(tmp_path, {0: 1, 1: 1, 2: 1, 3: 1}, "skip")


def test_mode_is_checked() -> None:
    with pytest.raises(KdadError, match=r"callbacks.finite_loss.mode='ignore'; use one of error, skip"):
        NonFiniteLossGuard(mode="ignore")
