"""kdad-predict and the normal-data thresholds of a really trained model.

One tiny RD model (resnet18, random init, 32 px, one epoch) is trained once, in-process through
the real ``kdad-train`` composition (callbacks included), with half of the 8 normal training
images held out; every test below reuses it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from kdad.checkpoint import load_model
from kdad.config import config_dir, register_resolvers
from kdad.data import AnomalyDataModule, generate_demo_dataset
from kdad.errors import KdadError
from kdad.predict import (
    CONTOUR_COLOR,
    Predictor,
    overlay_names,
    overlay_value_range,
    render_overlay,
    resolve_inputs,
)

register_resolvers()

SIZE = 32
FPR = 0.3
SEED = 111


def _compose(name: str, overrides: list[str]) -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train once; returns the dataset root, the checkpoint path and the test image folder."""
    from kdad.cli.train import train

    tmp = tmp_path_factory.mktemp("predict")
    root = generate_demo_dataset(
        tmp / "demo", categories=["weave"], image_size=SIZE, n_train=8, n_test_good=2, n_test_defect=2
    )
    run = tmp / "run"
    cfg = _compose(
        "train",
        [
            "experiment=demo",
            "hydra.sweeper.params=null",
            f"data.root={root}",
            "data.category=weave",
            f"data.image_size={SIZE}",
            "data.holdout_fraction=0.5",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "backbone.weights=none",
            "callbacks.progress_bar=null",
            "logger=none",
            "test=false",
            "print_config=false",
            f"callbacks.normal_thresholds.fpr={FPR}",
            f"paths.output_dir={run}",
            f"paths.work_dir={tmp}",
            f"seed={SEED}",
        ],
    )
    train(cfg)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return {"root": root, "ckpt": ckpt, "test": root / "weave" / "test"}


@pytest.fixture(scope="module")
def loaded(trained: dict) -> tuple[torch.nn.Module, dict]:
    """``load_model(checkpoint)``: the trained model and the checkpoint's kdad metadata."""
    return load_model(trained["ckpt"])


@pytest.fixture
def model(loaded: tuple[torch.nn.Module, dict]) -> torch.nn.Module:
    """The trained model as load_model restores it (shared: tests must not change it)."""
    return loaded[0]


def _rgb_tensor(path: Path | Image.Image) -> torch.Tensor:
    """An independent decode: PIL convert("RGB"), resize to the model size, uint8 [3,H,W]."""
    image = path if isinstance(path, Image.Image) else Image.open(path)
    rgb = image.convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


def _model_outputs(model: torch.nn.Module, images: list) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        output = model(torch.stack([_rgb_tensor(i) for i in images]))
    return output.score.numpy(), output.anomaly_map.numpy()


@pytest.mark.slow
def test_stored_thresholds_are_fpr_quantiles_of_the_held_out_images(
    trained: dict, loaded: tuple[torch.nn.Module, dict]
) -> None:
    model, meta = loaded
    stored = meta["thresholds"]
    assert stored["fpr"] == FPR and stored["holdout_images"] == 4
    assert stored["source"] == "holdout of 4 train/good images"
    assert meta["datamodule"]["holdout_fraction"] == 0.5
    assert model.normal_thresholds == stored  # restored by load_model
    # the same held-out images (data.seed), run through the loaded model, numpy's quantile
    dm = AnomalyDataModule(
        format="demo", root=str(trained["root"]), category="weave", image_size=SIZE, holdout_fraction=0.5, seed=SEED
    )
    held = [s.image_path for s in dm.samples("holdout")]
    assert len(held) == 4
    scores, maps = _model_outputs(model, held)
    assert stored["image"] == pytest.approx(np.quantile(scores, 1 - FPR, method="inverted_cdf"), rel=1e-5)
    assert stored["pixel"] == pytest.approx(np.quantile(maps, 1 - FPR, method="inverted_cdf"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.numerics
def test_predict_matches_the_model_and_writes_csv_json_overlays(
    trained: dict, model: torch.nn.Module, tmp_path: Path
) -> None:
    inputs = sorted(trained["test"].glob("*/*.png"))
    predictor = Predictor(model, SIZE, device="cpu", batch_size=3)
    report = predictor.run(str(trained["test"] / "*" / "*.png"), tmp_path, progress=False)
    rows = report["predictions"]
    assert [r["path"] for r in rows] == [str(p.resolve()) for p in inputs]
    scores, maps = _model_outputs(predictor.model, inputs)
    # batches of 3 (channels-last) vs one image at a time: float32 rounding of the same forward
    assert np.allclose([r["score"] for r in rows], scores, rtol=1e-5, atol=1e-6)
    thresholds = predictor.model.normal_thresholds
    assert report["thresholds"]["image"] == thresholds["image"] and report["thresholds"]["pixel"] == thresholds["pixel"]
    assert report["thresholds"]["image_source"].startswith("checkpoint: holdout of 4 train/good images")
    # the decision rule on the predictor's own scores (a re-computed score within float32 rounding
    # of the threshold could fall on the other side)
    assert [r["anomalous"] for r in rows] == [r["score"] > thresholds["image"] for r in rows]
    assert [r["defect_fraction"] for r in rows] == pytest.approx(
        [float((m > thresholds["pixel"]).mean()) for m in maps[:, 0]], abs=1e-3
    )
    assert report["num_images"] == len(inputs) == 4 and report["skipped"] == []
    assert report["method"] == "rd" and report["image_size"] == [SIZE, SIZE] and report["device"] == "cpu"
    # files
    saved = json.loads((tmp_path / "predictions.json").read_text())
    assert saved["predictions"] == rows and saved["thresholds"] == report["thresholds"]
    with (tmp_path / "predictions.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and [float(r["score"]) for r in table] == [r["score"] for r in rows]
    assert all(float(r["threshold"]) == thresholds["image"] for r in table)
    for row in rows:
        overlay = Image.open(row["overlay"])
        assert overlay.size == (SIZE, SIZE) and overlay.mode == "RGB"
    assert Path(rows[0]["overlay"]).name == f"{inputs[0].parent.name}__{inputs[0].stem}.png"
    # in memory, the same numbers and maps at the image size
    results = predictor.predict(inputs[:2])
    assert [r.score for r in results] == pytest.approx(scores[:2].tolist(), rel=1e-5)
    assert np.allclose(results[0].anomaly_map, maps[0, 0], atol=1e-5)
    assert np.array_equal(results[0].defect_mask, results[0].anomaly_map > thresholds["pixel"])


@pytest.mark.slow
@pytest.mark.numerics
def test_any_mode_and_size_and_overrides(trained: dict, model: torch.nn.Module, tmp_path: Path) -> None:
    source = np.array(Image.open(next(trained["test"].glob("good/*.png"))).convert("RGB"))
    folder = tmp_path / "in"
    folder.mkdir()
    grey = Image.fromarray(source[:, :, 1]).resize((70, 50))  # L, odd size
    grey.save(folder / "grey.png")
    rgba = np.concatenate([source, np.full((*source.shape[:2], 1), 90, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(folder / "rgba.png")
    Image.fromarray(source).save(folder / "rgb.png")
    sixteen = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "sixteen.png")  # I;16
    Image.fromarray((sixteen >> 8).astype(np.uint8)).save(folder / "sixteen_top_byte.png")

    predictor = Predictor(model, SIZE, device="cpu", threshold=0.5, pixel_threshold=0.25)
    report = predictor.run(folder, tmp_path / "out", progress=False)
    rows = {Path(r["path"]).name: r for r in report["predictions"]}
    assert sorted(rows) == ["grey.png", "rgb.png", "rgba.png", "sixteen.png", "sixteen_top_byte.png"]
    assert report["thresholds"]["image"] == 0.5 and report["thresholds"]["pixel"] == 0.25
    assert report["thresholds"]["image_source"] == "given (threshold=0.5)"
    for name, row in rows.items():
        assert Image.open(row["overlay"]).size == (row["width"], row["height"]), name
        assert row["anomalous"] == (row["score"] > 0.5)
    assert (rows["grey.png"]["width"], rows["grey.png"]["height"]) == (70, 50)
    (grey_score,), _ = _model_outputs(predictor.model, [grey])
    assert rows["grey.png"]["score"] == pytest.approx(float(grey_score), rel=1e-5)
    assert rows["rgba.png"]["score"] == pytest.approx(rows["rgb.png"]["score"], rel=1e-6)  # alpha dropped
    assert rows["sixteen.png"]["score"] == pytest.approx(rows["sixteen_top_byte.png"]["score"], rel=1e-6)
    # the pixel decision uses the given pixel threshold, on the map at the image's own size
    (result,) = predictor.predict([folder / "grey.png"])
    assert result.anomaly_map.shape == (50, 70)
    assert result.defect_fraction == pytest.approx(float((result.anomaly_map > 0.25).mean()))


@pytest.mark.slow
def test_errors_are_one_line_kdad_errors(
    trained: dict, model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def one_line(match: str, call, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(KdadError, match=match) as info:
            call(*args, **kwargs)
        assert "\n" not in str(info.value)

    one_line("input .*nowhere.png does not exist", resolve_inputs, tmp_path / "nowhere.png")
    (tmp_path / "empty").mkdir()
    one_line("no images .* in folder", resolve_inputs, tmp_path / "empty")
    one_line("no image files match input=", resolve_inputs, str(tmp_path / "empty" / "*.png"))
    monkeypatch.setattr(model, "normal_thresholds", None)  # as trained by a paper preset (data.holdout_fraction=0)
    one_line("stores no normal-data threshold .*pass threshold=", Predictor, model, SIZE)
    assert Predictor(model, SIZE, threshold=1.0).thresholds.pixel is None
    one_line("unknown device=tpu", Predictor, model, SIZE, threshold=1.0, device="tpu")
    if not torch.cuda.is_available():
        one_line("device=cuda but no CUDA GPU", Predictor, model, SIZE, threshold=1.0, device="cuda")
    # an unreadable image stops the run, or is skipped and listed
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image at all")
    Image.open(next(trained["test"].glob("good/*.png"))).save(folder / "fine.png")
    predictor = Predictor(model, SIZE, threshold=1.0)
    one_line(
        r"cannot read image .*broken.png.*skip_unreadable=true", predictor.run, folder, tmp_path / "o1", progress=False
    )
    report = predictor.run(folder, tmp_path / "o2", skip_unreadable=True, progress=False, overlays=False)
    assert [Path(r["path"]).name for r in report["predictions"]] == ["fine.png"]
    assert [Path(s["path"]).name for s in report["skipped"]] == ["broken.png"]
    assert json.loads((tmp_path / "o2" / "predictions.json").read_text())["skipped"] == report["skipped"]
    one_line(
        "none of the 1 input images could be read",
        predictor.run,
        folder / "broken.png",
        tmp_path / "o3",
        skip_unreadable=True,
        progress=False,
    )


def test_overlay_colours_scale_and_contour() -> None:
    from matplotlib import colormaps

    anomaly_map = np.full((20, 30), 0.2, np.float32)
    anomaly_map[5:10, 8:16] = 0.9  # the defect: above the pixel threshold 0.5
    assert overlay_value_range(anomaly_map, 0.5) == pytest.approx((0.2, 0.8))  # median 0.2 .. 2t - median
    assert overlay_value_range(np.full((4, 4), 0.7), 0.5) == pytest.approx((0.3, 0.7))  # median above t
    assert overlay_value_range(anomaly_map, None) == pytest.approx((0.2, 0.9))
    rgb = np.full((20, 30, 3), 100, np.uint8)
    picture = render_overlay(rgb, anomaly_map, (0.2, 0.8), anomaly_map > 0.5, alpha=0.5)
    assert picture.shape == (20, 30, 3) and picture.dtype == np.uint8
    jet = colormaps["jet"]
    blue = np.rint(0.5 * 100 + 0.5 * 255 * np.array(jet(0.0)[:3]))
    red = np.rint(0.5 * 100 + 0.5 * 255 * np.array(jet(1.0)[:3]))
    assert np.array_equal(picture[0, 0], blue) and np.array_equal(picture[7, 12], red)
    outline = np.zeros((20, 30), bool)
    outline[5:10, 8:16] = True
    outline[6:9, 9:15] = False  # the defect's one-pixel border
    assert np.all(picture[outline] == CONTOUR_COLOR) and not np.any(np.all(picture[~outline] == CONTOUR_COLOR, axis=1))


def test_overlay_names_are_unique_relative_paths() -> None:
    paths = [Path("/d/test/good/000.png"), Path("/d/test/hole/000.png"), Path("/d/test/hole/000.jpg")]
    assert overlay_names(paths) == ["good__000.png", "hole__000.png", "hole__000_1.png"]
    assert overlay_names([Path("/x/a.bmp")]) == ["a.png"]


@pytest.mark.slow
def test_the_predict_entry_point(trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Hydra composition in-process (a user error: one line, exit status 2), then the
    console entry point in a subprocess (Predictor.from_checkpoint, a glob, a threshold)."""
    from kdad.cli.common import report_user_errors
    from kdad.cli.predict import predict

    cfg = _compose(
        "predict", [f"ckpt={trained['ckpt']}", f"input={tmp_path / 'none'}", f"paths.output_dir={tmp_path / 'run'}"]
    )
    assert cfg.threshold is None and cfg.device == "auto" and cfg.skip_unreadable is False
    with pytest.raises(SystemExit) as exit_info:
        report_user_errors(predict)(cfg)
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and error.startswith("kdad: error: input ") and "\n" not in error

    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "HYDRA_FULL_ERROR": "0"}
    pattern = trained["test"] / "*" / "0*.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad.cli.predict",
            f"ckpt={trained['ckpt']}",
            f"input={pattern}",
            "threshold=0.75",
            f"output_dir={tmp_path / 'cli'}",
            f"paths.log_dir={tmp_path / 'logs'}",
            "progress=false",
            "device=cpu",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((tmp_path / "cli" / "predictions.json").read_text())
    assert saved["num_images"] == 4 and saved["checkpoint"] == str(trained["ckpt"])
    assert saved["thresholds"]["image"] == 0.75 and saved["thresholds"]["image_source"] == "given (threshold=0.75)"
    assert saved["thresholds"]["pixel_source"].startswith("checkpoint: holdout of 4 train/good images")
    assert len(list((tmp_path / "cli" / "overlays").glob("*.png"))) == 4
    assert f"predictions: {tmp_path / 'cli' / 'predictions.csv'}" in proc.stdout
