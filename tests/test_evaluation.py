"""The shared test step: metrics equal an independent evaluation of the same model outputs;
checkpoints round-trip safely and bad ones fail in one line."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdad.checkpoint import load_model, read_checkpoint
from kdad.data import AnomalyDataModule
from kdad.errors import KdadError
from kdad.methods import ReverseDistillation
from kdad.metrics import evaluate


def _trainer(tmp_path: Path, **kwargs: object) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,  # type: ignore[arg-type]
    )


def _reference_metrics(
    model: ReverseDistillation, datamodule: AnomalyDataModule, native: bool, batch_size: int
) -> dict[str, float]:
    """Decode and resize the test images with PIL, run the model on them in the test loader's
    batches (the same batch composition gives the same float32 kernels, hence the same maps),
    and evaluate with kdad.metrics.evaluate on masks read straight from the files (binarised
    != 0 at native size, or resized + > 0.5)."""
    model.eval()
    samples = datamodule.samples("test")
    size = datamodule.image_size
    images = []
    for sample in samples:
        image = Image.open(sample.image_path).convert("RGB")
        images.append(torch.from_numpy(np.asarray(image.resize((size[1], size[0]), Image.BILINEAR))).permute(2, 0, 1))
    # the datamodule's tensors are the PIL tensors: the forward passes below see identical inputs
    loaded = torch.cat([batch.image for batch in datamodule.test_dataloader()])
    assert torch.equal(loaded, torch.stack(images))
    with torch.no_grad():
        outputs = [
            model(torch.stack(images[start : start + batch_size])) for start in range(0, len(images), batch_size)
        ]
    all_scores = torch.cat([out.score for out in outputs])
    all_maps = torch.cat([out.anomaly_map for out in outputs])
    scores, labels, maps, masks = [], [], [], []
    for index, sample in enumerate(samples):
        width, height = Image.open(sample.image_path).size
        if sample.mask_path is not None:
            mask_img = Image.open(sample.mask_path).convert("L")
            mask = (np.asarray(mask_img) != 0).astype(np.float32)
        else:
            mask = np.zeros((height, width), np.float32)
        anomaly_map = all_maps[index : index + 1]
        if native:
            anomaly_map = F.interpolate(anomaly_map, size=mask.shape, mode="bilinear", align_corners=False)
        else:
            t = F.interpolate(torch.from_numpy(mask)[None, None], size=size, mode="bilinear", align_corners=False)
            mask = (t[0, 0].numpy() > 0.5).astype(np.float32)
        scores.append(float(all_scores[index]))
        labels.append(sample.label)
        maps.append(anomaly_map[0, 0].numpy())
        masks.append(mask)
    return evaluate(np.array(scores), np.array(labels), maps, masks)


@pytest.mark.numerics
@pytest.mark.parametrize("mask_resolution", ["input", "native"])
def test_test_step_metrics_equal_an_independent_evaluation(
    tiny_mvtec: Path, tmp_path: Path, mask_resolution: str
) -> None:
    """The test step's data path (cached resize, masks at input or native resolution), its
    metric states and its one evaluation equal an independent path on the same model outputs.

    Both paths run the same model on the same tensors in the same batches, so their maps are
    bit-identical and the metrics must agree exactly: a rank metric (AUROC, AU-PRO) would move
    through reordered near-ties if the two forward passes differed by float32 rounding (batch 1
    vs batch 3 did, by 1.3e-5 AU-PRO on AVX-512 kernels)."""
    torch.manual_seed(0)
    batch_size = 3
    datamodule = AnomalyDataModule(
        format="mvtec",
        root=str(tiny_mvtec),
        category="alpha",
        image_size=32,
        eval_batch_size=batch_size,
        mask_resolution=mask_resolution,
    )
    model = ReverseDistillation(backbone="resnet18", weights="none")
    trainer = _trainer(tmp_path)
    trainer.test(model, datamodule=datamodule, verbose=False)
    reference = _reference_metrics(model, datamodule, mask_resolution == "native", batch_size)
    assert set(model.test_results) == set(reference)
    for key, value in reference.items():
        assert model.test_results[key] == value, key


def test_checkpoint_round_trip_without_downloads(tiny_mvtec: Path, tmp_path: Path) -> None:
    datamodule = AnomalyDataModule(
        format="mvtec", root=str(tiny_mvtec), category="beta", image_size=32, train_batch_size=3
    )
    model = ReverseDistillation(backbone="resnet18", weights="none", loss="pixel")
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded, meta = load_model(path)
    assert meta["method"] == "rd" and meta["hparams"]["loss"] == "pixel"
    assert meta["datamodule"]["category"] == "beta"
    assert loaded.hparams["weights"] == "none" and loaded.hparams["loss"] == "pixel"
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).anomaly_map, model(x).anomaly_map)


def test_image_size_that_rd_cannot_take_is_a_one_line_error() -> None:
    model = ReverseDistillation(backbone="resnet18", weights="none").eval()
    with pytest.raises(KdadError, match=r"multiples of 32.*data.image_size"):
        model(torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


def test_bad_checkpoints_fail_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(KdadError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(b"PK\x03\x04 not really a checkpoint")
    with pytest.raises(KdadError, match="could not be read safely") as info:
        read_checkpoint(truncated)
    assert "\n" not in str(info.value)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(KdadError, match="not written by kdad-train"):
        read_checkpoint(foreign)
    other_method = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "kdad": {"format": 1, "method": "no_such_method", "hparams": {}}}, other_method)
    with pytest.raises(KdadError, match="no_such_method"):
        load_model(other_method)
    future = tmp_path / "future.ckpt"
    torch.save({"state_dict": {}, "kdad": {"format": 99, "method": "rd", "version": "9.0", "hparams": {}}}, future)
    with pytest.raises(KdadError, match="format 99"):
        load_model(future)


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "kdad": {"format": 1}, "x": Payload()}, path)
    with pytest.raises(KdadError, match="could not be read safely"):
        read_checkpoint(path)


@pytest.mark.numerics
def test_monitoring_is_logged_separately_and_never_changes_the_reported_model(tiny_mvtec: Path, tmp_path: Path) -> None:
    """trainer=monitor evaluates the test set periodically under monitor/*; the reported
    metrics come from the last epoch and equal a run without monitoring."""
    results = {}
    for monitor in (False, True):
        torch.manual_seed(0)
        datamodule = AnomalyDataModule(
            format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=32, train_batch_size=3
        )
        model = ReverseDistillation(backbone="resnet18", weights="none")
        extra = {"limit_val_batches": 1.0, "check_val_every_n_epoch": 1} if monitor else {"limit_val_batches": 0}
        trainer = _trainer(
            tmp_path / str(monitor), max_epochs=2, enable_checkpointing=False, num_sanity_val_steps=0, **extra
        )
        trainer.fit(model, datamodule=datamodule)
        if monitor:
            assert "monitor/image_auroc" in trainer.logged_metrics
        trainer.test(model, datamodule=datamodule, verbose=False)
        results[monitor] = dict(model.test_results)
    assert results[True] == pytest.approx(results[False], abs=1e-6)


def test_bf16_mixed_training_keeps_float32_maps_and_metrics(tiny_mvtec: Path, tmp_path: Path) -> None:
    datamodule = AnomalyDataModule(
        format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=32, train_batch_size=3
    )
    model = ReverseDistillation(backbone="resnet18", weights="none")
    trainer = _trainer(tmp_path, max_epochs=1, enable_checkpointing=False, precision="bf16-mixed")
    trainer.fit(model, datamodule=datamodule)
    outputs = trainer.predict(model, datamodule=datamodule)
    assert outputs and all(o["anomaly_map"].dtype == torch.float32 for o in outputs)
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert all(np.isfinite(v) for v in model.test_results.values())
