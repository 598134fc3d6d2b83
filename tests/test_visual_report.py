"""The visual report callback: every picture written fast from hand-made test outputs, the
plotted curves are the reported metrics, the worst cases are the right images; the config
option; results.json's test-set thresholds after a real ``trainer.test``."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from kdad.callbacks import VisualReport, visual_report
from kdad.callbacks.visual_report import F1_THRESHOLD_LABEL, report_figures
from kdad.config import config_dir, instantiate_collection, register_resolvers
from kdad.data.batch import Batch
from kdad.methods.base import AnomalyModule, AnomalyOutput
from kdad.metrics import AnomalyMetrics, MetricCurves, f1_max_threshold

N_IMAGES, SIZE, BATCH, WORST = 20, 64, 5, 4
PICTURES = {"roc.png", "pr.png", "pro.png", "score_histogram.png", "worst_cases.png"}

register_resolvers()


def hand_made_outputs(seed: int = 0) -> dict[str, Any]:
    """20 test images of 64x64 (10 normal, 10 with a square defect) with overlapping scores."""
    rng = np.random.default_rng(seed)
    labels = torch.tensor([0] * 10 + [1] * 10)
    masks = torch.zeros(N_IMAGES, 1, SIZE, SIZE)
    for i in range(10, N_IMAGES):
        r, c = rng.integers(0, SIZE - 12, size=2)
        masks[i, 0, r : r + 12, c : c + 12] = 1
    maps = torch.from_numpy(rng.random((N_IMAGES, 1, SIZE, SIZE)).astype(np.float32))
    maps = maps + torch.from_numpy(rng.uniform(0.0, 0.6, N_IMAGES).astype(np.float32))[:, None, None, None] * masks
    scores = maps.amax(dim=(1, 2, 3)) + torch.from_numpy(rng.normal(0, 0.05, N_IMAGES).astype(np.float32))
    images = torch.from_numpy(rng.integers(0, 256, (N_IMAGES, 3, SIZE, SIZE), dtype=np.uint8))
    paths = [f"/data/cat/test/{'good' if y == 0 else 'square'}/{i:03d}.png" for i, y in enumerate(labels.tolist())]
    return {"labels": labels, "masks": masks, "maps": maps, "scores": scores, "images": images, "paths": paths}


def metric_curves(data: dict[str, Any], pixel: bool = True) -> tuple[dict[str, float], MetricCurves]:
    metric = AnomalyMetrics(pixel=pixel)
    if pixel:
        metric.update(data["scores"], data["labels"], data["maps"], data["masks"])
    else:
        metric.update(data["scores"], data["labels"])
    values = metric.compute()
    assert metric.curves is not None
    return values, metric.curves


def run_callback(callback: VisualReport, data: dict[str, Any], module: Any, root: Path) -> float:
    """Drive the callback's hooks as Lightning's test loop does; the CPU seconds they took."""
    trainer = SimpleNamespace(default_root_dir=str(root), is_global_zero=True)
    start = time.process_time()
    callback.on_test_epoch_start(trainer, module)  # type: ignore[arg-type]
    for b in range(0, N_IMAGES, BATCH):
        part = slice(b, b + BATCH)
        batch = Batch(
            image=data["images"][part], label=data["labels"][part], mask=data["masks"][part], path=data["paths"][part]
        )
        outputs = {"anomaly_map": data["maps"][part], "score": data["scores"][part]}
        callback.on_test_batch_end(trainer, module, outputs, batch, b // BATCH)  # type: ignore[arg-type]
    callback.on_test_end(trainer, module)  # type: ignore[arg-type]
    return time.process_time() - start


@pytest.fixture(scope="module")
def data() -> dict[str, Any]:
    return hand_made_outputs()


@pytest.fixture(scope="module")
def report(data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One report written by the callback (after a warm-up that imports matplotlib)."""
    values, curves = metric_curves(data)
    module = SimpleNamespace(test_curves=curves, normal_thresholds={"image": 1.1, "pixel": 0.9, "fpr": 0.01})
    run_callback(VisualReport(worst_cases=1), data, module, tmp_path_factory.mktemp("warm"))
    callback = VisualReport(worst_cases=WORST)
    with mock.patch.object(visual_report, "render_worst_cases", wraps=visual_report.render_worst_cases) as grid:
        seconds = run_callback(callback, data, module, tmp_path_factory.mktemp("run"))
    return {
        "callback": callback,
        "seconds": seconds,
        "rows": grid.call_args.args[0],
        "values": values,
        "curves": curves,
    }


def test_the_report_writes_every_picture_fast(report: dict[str, Any]) -> None:
    callback = report["callback"]
    assert callback.report_dir is not None and callback.report_dir.name == "report"
    assert {p.name for p in callback.files} == PICTURES
    for path in callback.files:
        with Image.open(path) as picture:
            assert picture.format == "PNG" and min(picture.size) >= 300, path.name
    # CPU seconds (not wall time, which a busy machine inflates): about 0.5; a matplotlib
    # subplot grid of the worst cases alone would take several
    assert report["seconds"] < 2.0, f"the visual report took {report['seconds']:.2f} CPU s for 20 images"


def test_worst_cases_are_the_highest_normal_and_lowest_anomalous(report: dict[str, Any], data: dict[str, Any]) -> None:
    scores, labels = data["scores"].numpy(), data["labels"].numpy()
    normal, anomalous = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    worst_fp = normal[np.argsort(-scores[normal], kind="stable")][:WORST]
    worst_fn = anomalous[np.argsort(scores[anomalous], kind="stable")][:WORST]
    expected = [f"worst false positive #{k}: good/{i:03d}.png" for k, i in enumerate(worst_fp, 1)]
    expected += [f"worst false negative #{k}: square/{i:03d}.png" for k, i in enumerate(worst_fn, 1)]
    rows = report["rows"]
    assert [row["kind"] for row in rows] == expected
    for row, index in zip(rows, [*worst_fp, *worst_fn]):
        assert row["score"] == pytest.approx(float(scores[index]))
        assert torch.equal(row["map"], data["maps"][index, 0]) and torch.equal(row["image"], data["images"][index])
        assert torch.equal(row["mask"], data["masks"][index, 0])


def _lines(fig: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))


def test_plotted_curves_are_the_reported_metrics(report: dict[str, Any], data: dict[str, Any]) -> None:
    values, curves = report["values"], report["curves"]
    figures = report_figures(data["scores"].numpy(), data["labels"].numpy() != 0, curves, 1.1, 0.01)
    assert set(figures) == PICTURES - {"worst_cases.png"}
    for fig in figures.values():
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_legend() is not None
    roc = _lines(figures["roc.png"])
    for level in ("image", "pixel"):
        label = next(k for k in roc if k.startswith(f"{level} AUROC = {values[f'{level}_auroc']:.4f}"))
        x, y = roc[label].get_xdata(), roc[label].get_ydata()
        assert _trapezoid(np.asarray(x), np.asarray(y)) == pytest.approx(values[f"{level}_auroc"], abs=1e-9)
    pr = _lines(figures["pr.png"])
    for level in ("image", "pixel"):
        label = next(k for k in pr if k.startswith(f"{level} AP = {values[f'{level}_ap']:.4f}"))
        recall, precision = np.asarray(pr[label].get_xdata()), np.asarray(pr[label].get_ydata())
        assert pr[label].get_drawstyle() == "steps-pre"
        assert float(np.sum(np.diff(recall) * precision[1:])) == pytest.approx(values[f"{level}_ap"], abs=1e-9)
    ((pro_label, pro_line),) = _lines(figures["pro.png"]).items()
    assert f"= {values['aupro']:.4f}" in pro_label and "0.3" in pro_label
    x, y = np.asarray(pro_line.get_xdata()), np.asarray(pro_line.get_ydata())
    assert _trapezoid(x, y) / 0.3 == pytest.approx(values["aupro"], abs=1e-9)
    histogram = _lines(figures["score_histogram.png"])
    f1_label = next(k for k in histogram if k.startswith(F1_THRESHOLD_LABEL))
    assert histogram[f1_label].get_xdata()[0] == curves.image_f1_threshold
    assert curves.image_f1_threshold == f1_max_threshold(data["scores"], data["labels"])
    normal_label = next(k for k in histogram if k.startswith("normal-data threshold"))
    assert "FPR 0.01" in normal_label and histogram[normal_label].get_xdata()[0] == 1.1


def test_image_only_report_without_normal_thresholds(data: dict[str, Any], tmp_path: Path) -> None:
    _, curves = metric_curves(data, pixel=False)
    callback = VisualReport(worst_cases=0)
    run_callback(callback, data, SimpleNamespace(test_curves=curves, normal_thresholds=None), tmp_path)
    assert {p.name for p in callback.files} == {"roc.png", "pr.png", "score_histogram.png"}
    figures = report_figures(data["scores"].numpy(), data["labels"].numpy() != 0, curves)
    assert not any(k.startswith("pixel") for k in _lines(figures["roc.png"]))
    assert not any(k.startswith("normal-data") for k in _lines(figures["score_histogram.png"]))


def test_visual_report_is_a_config_option(tmp_path: Path) -> None:
    def callbacks(name: str, *overrides: str) -> list[Any]:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(config_name=name, overrides=[f"paths.output_dir={tmp_path}", *overrides])
        return instantiate_collection(cfg.callbacks)

    assert any(isinstance(cb, VisualReport) for cb in callbacks("train"))
    assert any(isinstance(cb, VisualReport) for cb in callbacks("eval", "ckpt=x"))
    found = [cb for cb in callbacks("train", "callbacks.visual_report.worst_cases=8") if isinstance(cb, VisualReport)]
    assert found[0].worst_cases == 8
    assert not any(isinstance(cb, VisualReport) for cb in callbacks("train", "callbacks.visual_report=null"))


class BrightnessDetector(AnomalyModule):
    """The smallest kdad method: the anomaly map is the squared normalised pixel value (no
    network to build, so the test pays only for Lightning's test loop)."""

    method_name = "brightness"

    def anomaly_output(self, x: torch.Tensor) -> AnomalyOutput:
        anomaly_map = x.pow(2).mean(dim=1, keepdim=True)
        return AnomalyOutput(anomaly_map, anomaly_map.amax(dim=(1, 2, 3)))


def test_results_json_gets_the_test_set_thresholds(tiny_mvtec: Path, tmp_path: Path) -> None:
    """A real ``trainer.test``: the callback's report and results.json's sections."""
    from kdad.cli.common import collect_results
    from kdad.data import AnomalyDataModule

    datamodule = AnomalyDataModule(
        format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=32, eval_batch_size=3
    )
    model = BrightnessDetector()
    callback = VisualReport(worst_cases=2)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.test(model, datamodule=datamodule, verbose=False)
    assert {p.name for p in callback.files} == PICTURES
    model.normal_thresholds = {"image": 0.5, "pixel": 0.4, "fpr": 0.01, "source": "test", "holdout_images": 2}
    results = collect_results(
        model=model,
        datamodule=datamodule,
        trainer=trainer,
        seed=0,
        output_dir=tmp_path,
        train_seconds=None,
        config=None,
        checkpoint=None,
    )
    section = results["test_set_thresholds"]
    assert section["label"].startswith("TEST-SET-DERIVED")
    scores, labels = torch.cat(callback._scores), torch.cat(callback._labels)
    assert section["image_f1_threshold"] == f1_max_threshold(scores, labels)
    assert isinstance(section["pixel_f1_threshold"], float)
    assert results["normal_thresholds"] == model.normal_thresholds
    assert set(results["metrics"]) == set(model.test_results)  # the metrics section is unchanged
