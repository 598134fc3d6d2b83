"""Normal-data thresholds: the held-out split of the training images, the FPR quantile and the
NormalThresholds callback (the trained-model round trip is in tests/test_predict.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from kdad.callbacks import NormalThresholds
from kdad.callbacks.thresholds import fpr_threshold
from kdad.config import config_dir, register_resolvers
from kdad.data import AnomalyDataModule
from kdad.data.datamodule import holdout_count
from kdad.errors import KdadError
from kdad.methods import ReverseDistillation

register_resolvers()


# ------------------------------------------------------------------------------ the quantile
def test_fpr_threshold_by_hand() -> None:
    values = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    # at most 30 % of 5 values (1.5) above t: t = 4 (one value above); t = 3 has two (40 %)
    assert fpr_threshold(values, 0.3) == 4.0
    assert fpr_threshold(values, 0.2) == 4.0  # exactly 20 % above 4 is allowed
    assert fpr_threshold(values, 0.19) == 5.0
    assert fpr_threshold(values, 0.01) == 5.0  # fewer than 1/fpr values: the maximum
    assert fpr_threshold(values, 0.99) == 1.0
    assert fpr_threshold(np.array([[7.0]]), 0.5) == 7.0


def test_fpr_threshold_equals_numpy_inverted_cdf_quantile() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 99, 100, 101, 1000, 4097):
        values = rng.normal(size=n).astype(np.float32)
        for fpr in (0.001, 0.01, 0.05, 0.1, 0.3, 0.5):
            expected = np.quantile(values.astype(np.float64), 1 - fpr, method="inverted_cdf")
            assert fpr_threshold(values, fpr) == expected, (n, fpr)
            # the defining property: at most fpr above it, and it is one of the values
            assert np.mean(values > fpr_threshold(values, fpr)) <= fpr + 1e-12
            assert fpr_threshold(values, fpr) in values
    with pytest.raises(ValueError):
        fpr_threshold(np.array([]), 0.1)


# ------------------------------------------------------------------------------ the split
def test_holdout_count_by_hand() -> None:
    assert [holdout_count(n, 0.1) for n in (1, 8, 10, 24, 30, 209)] == [1, 1, 1, 3, 3, 21]
    assert holdout_count(100, 0.0) == 0 and holdout_count(6, 0.5) == 3


def _datamodule(root: Path, **kwargs: object) -> AnomalyDataModule:
    options = {
        "format": "mvtec",
        "root": str(root),
        "category": "alpha",
        "image_size": 32,
        "train_batch_size": 2,
        "eval_batch_size": 2,
        "holdout_fraction": 0.5,
        "seed": 3,
    }
    options.update(kwargs)
    return AnomalyDataModule(**options)  # type: ignore[arg-type]


def test_holdout_is_deterministic_logged_and_never_trained_on(
    tiny_mvtec: Path, caplog: pytest.LogCaptureFixture
) -> None:
    every = sorted(str(p) for p in (tiny_mvtec / "alpha" / "train" / "good").glob("*.png"))
    with caplog.at_level(logging.INFO, logger="kdad.data.datamodule"):
        dm = _datamodule(tiny_mvtec)
        assert dm.num_holdout == 3 and dm.num_train == 3
    assert "holding out 3 of 6 normal training images of mvtec/alpha" in caplog.text
    held = {str(s.image_path) for s in dm.samples("holdout")}
    dm.setup("fit")
    trained = {p for _ in range(4) for batch in dm.train_dataloader() for p in batch.path}
    assert trained.isdisjoint(held) and sorted(trained | held) == every
    assert set(dm.train_dataset.paths) == trained
    batches = list(dm.holdout_dataloader())
    assert [p for b in batches for p in b.path] == sorted(held)  # fixed order
    assert all(b.aug_image is None and int(b.label.sum()) == 0 for b in batches)
    assert dm.holdout_dataset is not None and dm.holdout_dataset.images.shape == (3, 3, 32, 32)
    # seeded by data.seed: the same seed gives the same split, other seeds other splits
    assert {str(s.image_path) for s in _datamodule(tiny_mvtec).samples("holdout")} == held
    splits = {
        frozenset(str(s.image_path) for s in _datamodule(tiny_mvtec, seed=s).samples("holdout")) for s in range(6)
    }
    assert len(splits) > 1


def test_synthetic_training_excludes_the_holdout_and_the_holdout_has_no_anomalies(tiny_mvtec: Path) -> None:
    dm = _datamodule(tiny_mvtec, synthesis={"foreground": "none", "perlin_scale_exp": [1, 3]})
    held = {str(s.image_path) for s in dm.samples("holdout")}
    synthetic = dm.synthetic_train_dataset
    assert len(synthetic) == 3
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)  # type: ignore[union-attr]
    seen = {p for batch in loader for p in batch.path}
    assert len(seen) == 3 and seen.isdisjoint(held)
    assert all(b.aug_image is None and b.aug_mask is None for b in dm.holdout_dataloader())


def test_holdout_errors_and_zero(tiny_mvtec: Path) -> None:
    for bad in (1.0, -0.1, "0.1"):
        with pytest.raises(KdadError, match=r"data.holdout_fraction=.*use a fraction in \[0, 1\)"):
            _datamodule(tiny_mvtec, holdout_fraction=bad)
    with pytest.raises(KdadError, match="holds out all 6 training images of mvtec/alpha"):
        _datamodule(tiny_mvtec, holdout_fraction=0.9).samples("train")
    none = _datamodule(tiny_mvtec, holdout_fraction=0)
    assert none.num_holdout == 0 and none.num_train == 6
    with pytest.raises(KdadError, match=r"set data.holdout_fraction"):
        none.holdout_dataloader()
    assert AnomalyDataModule(format="mvtec", root=str(tiny_mvtec), category="alpha").num_holdout == 0  # Python default


def _compose(overrides: list[str]) -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=["paths.output_dir=/tmp/x", *overrides])


@pytest.mark.slow
def test_paper_presets_train_on_every_image_and_general_use_holds_out() -> None:
    for dataset in ("mvtec", "visa", "mpdd", "btad"):
        for method in ("rd", "urd"):
            cfg = _compose([f"experiment={dataset}_{method}"])
            assert cfg.data.holdout_fraction == 0, (dataset, method)
    for overrides in ([], ["data=ksdd2"], ["experiment=demo"]):
        assert _compose(overrides).data.holdout_fraction == 0.1, overrides
    assert _compose([]).callbacks.normal_thresholds.fpr == 0.01


# ------------------------------------------------------------------------------ the callback
class _FakeTrainer(SimpleNamespace):
    """What NormalThresholds reads from a Trainer (no training needed to test it)."""

    def save_checkpoint(self, path: str, weights_only: bool = False) -> None:
        self.saved.append(path)


def _checkpointer(best: str = "", last: str = "", monitor: str | None = None, step: int = 7) -> SimpleNamespace:
    """What NormalThresholds reads from a ModelCheckpoint."""
    return SimpleNamespace(best_model_path=best, last_model_path=last, monitor=monitor, _last_global_step_saved=step)


def _trainer(datamodule: AnomalyDataModule, callbacks: list[SimpleNamespace]) -> _FakeTrainer:
    from lightning.pytorch.plugins.precision import Precision

    return _FakeTrainer(
        datamodule=datamodule, precision_plugin=Precision(), checkpoint_callbacks=callbacks, global_step=7, saved=[]
    )


@pytest.fixture(scope="module")
def untrained() -> ReverseDistillation:
    torch.manual_seed(0)
    return ReverseDistillation(backbone="resnet18", weights="none")


@pytest.mark.slow
def test_callback_sets_quantiles_of_the_holdout_outputs_and_resaves(
    tiny_mvtec: Path, untrained: ReverseDistillation
) -> None:
    model = untrained
    model.train()
    dm = _datamodule(tiny_mvtec, holdout_fraction=0.5)
    trainer = _trainer(
        dm,
        [
            _checkpointer(best="/run/checkpoints/last.ckpt"),  # kdad's: no monitor, the latest save is "best"
            _checkpointer(best="/run/best.ckpt", last="/run/last2.ckpt", monitor="monitor/image_auroc"),
            _checkpointer(best="/run/selected.ckpt", monitor="monitor/image_auroc"),  # never overwritten
            _checkpointer(best="/run/old.ckpt", step=5),  # older weights: not re-saved
        ],
    )
    NormalThresholds(fpr=0.25).on_fit_end(trainer, model)  # type: ignore[arg-type]
    assert model.training, "the model's mode is restored"
    # independent reference: decode the held-out files, run the model, numpy quantiles
    held = [s.image_path for s in dm.samples("holdout")]
    images = torch.stack(
        [
            torch.from_numpy(np.array(Image.open(p).convert("RGB").resize((32, 32), Image.BILINEAR))).permute(2, 0, 1)
            for p in held
        ]
    )
    model.eval()
    with torch.no_grad():
        output = model(images)
    stored = model.normal_thresholds
    assert stored["image"] == pytest.approx(np.quantile(output.score.numpy(), 0.75, method="inverted_cdf"), rel=1e-5)
    assert stored["pixel"] == pytest.approx(
        np.quantile(output.anomaly_map.numpy(), 0.75, method="inverted_cdf"), rel=1e-5
    )
    assert stored["fpr"] == 0.25 and stored["holdout_images"] == 3
    assert stored["source"] == "holdout of 3 train/good images"
    assert trainer.saved == ["/run/checkpoints/last.ckpt", "/run/last2.ckpt"]
    # what the checkpoint records (plain JSON types)
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["kdad"]["thresholds"] == stored


def test_callback_without_holdout_stores_nothing(
    tiny_mvtec: Path, untrained: ReverseDistillation, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = untrained
    monkeypatch.setattr(model, "normal_thresholds", None, raising=False)
    trainer = _trainer(_datamodule(tiny_mvtec, holdout_fraction=0), [_checkpointer(best="/run/last.ckpt")])
    with caplog.at_level(logging.WARNING, logger="kdad.callbacks.thresholds"):
        NormalThresholds().on_fit_end(trainer, model)  # type: ignore[arg-type]
    assert model.normal_thresholds is None and trainer.saved == []
    assert "kdad-predict will need threshold=" in caplog.text
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["kdad"]["thresholds"] is None
    for bad in (0, 1, 1.5, True):
        with pytest.raises(KdadError, match=r"callbacks.normal_thresholds.fpr"):
            NormalThresholds(fpr=bad)
