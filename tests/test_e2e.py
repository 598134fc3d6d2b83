"""End-to-end: real Hydra runs of kdad-train / kdad-eval in subprocesses on tiny generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TRAIN = [sys.executable, "-m", "kdad.cli.train"]
EVAL = [sys.executable, "-m", "kdad.cli.evaluate"]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TORCH_HOME=str(tmp_path / "torch_home"),  # never find (or fetch) real weights
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="0",
    )
    return env


E2E_CATEGORIES = ("weave", "washer")


@pytest.fixture(scope="module")
def e2e_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo generator at 64 px: 24 training and 14 test images in each of two categories
    (enough for 8 epochs of RD to beat chance clearly; measured 0.92 image / 0.90 pixel AUROC
    on weave with a random-init resnet18)."""
    from kdad.data import generate_demo_dataset

    root = tmp_path_factory.mktemp("e2e_demo")
    return generate_demo_dataset(
        root, categories=list(E2E_CATEGORIES), image_size=64, n_train=24, n_test_good=6, n_test_defect=8
    )


def _tiny_run_args(demo_root: Path, out: Path, category: str | None = None) -> list[str]:
    args = [
        "experiment=demo",
        "hydra.sweeper.params=null",
        f"data.root={demo_root}",
        "data.category=weave",
        "data.image_size=64",
        "data.train_batch_size=8",
        "trainer.max_epochs=8",
        "trainer.accelerator=cpu",
        "backbone.weights=none",
        "callbacks.progress_bar=null",
        f"paths.log_dir={out}",
        "print_config=false",
    ]
    if category:
        args.append(f"data.category={category}")
    return args


def _run(cmd: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=timeout, cwd=tmp_path)


def _results(folder: Path) -> list[Path]:
    return sorted(folder.rglob("results.json"))


@pytest.fixture(scope="module")
def trained_run(e2e_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("e2e_train")
    proc = _run([*TRAIN, *_tiny_run_args(e2e_root, tmp / "out")], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = _results(tmp / "out")
    assert len(found) == 1, found
    return found[0].parent, json.loads(found[0].read_text())


def test_train_writes_complete_results(trained_run: tuple[Path, dict]) -> None:
    run_dir, results = trained_run
    metrics = results["metrics"]
    for key in (
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1_max",
        "aupro",
        "rd_legacy_pro",
    ):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert results["method"] == "rd" and results["backbone"] == "resnet18"
    assert results["dataset"] == "demo" and results["seed"] == 111
    assert results["epochs"] == 8 and results["global_steps"] == 8 * 3
    assert results["parameters"]["trainable"] > 0 and results["parameters"]["frozen"] > 0
    assert results["train_seconds"] > 0 and results["inference_images_per_second"] > 0
    assert "random" in results["weights"] or "none" in results["weights"]
    assert results["versions"]["torch"] and results["git_revision"]
    assert results["evaluation_protocol"]["model_selection"].startswith("last epoch")
    assert (run_dir / "anomaly_maps.png").stat().st_size > 10_000
    assert Path(results["checkpoint"]).is_file()


def test_trained_model_detects_defects_above_chance(trained_run: tuple[Path, dict]) -> None:
    metrics = trained_run[1]["metrics"]
    assert metrics["image_auroc"] > 0.75, metrics
    assert metrics["pixel_auroc"] > 0.75, metrics


def test_eval_reproduces_the_training_metrics(trained_run: tuple[Path, dict], tmp_path: Path) -> None:
    _, results = trained_run
    proc = _run(
        [*EVAL, f"ckpt={results['checkpoint']}", f"paths.log_dir={tmp_path / 'eval'}", "callbacks.progress_bar=null"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = _results(tmp_path / "eval")
    evaluated = json.loads(found.read_text())
    for key, value in results["metrics"].items():
        assert evaluated["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert evaluated["train_seconds"] is None


def test_readme_command_on_an_mvtec_layout_dataset(tiny_mvtec: Path, tmp_path: Path) -> None:
    """The README's `kdad-train method=rd backbone=... data=mvtec data.root=... data.category=...`."""
    proc = _run(
        [
            *TRAIN,
            "method=rd",
            "backbone=resnet18",
            "backbone.weights=none",
            "data=mvtec",
            f"data.root={tiny_mvtec}",
            "data.category=alpha",
            "data.image_size=32",
            "trainer.max_epochs=1",
            "callbacks.progress_bar=null",
            f"paths.log_dir={tmp_path / 'out'}",
            "print_config=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = _results(tmp_path / "out")
    results = json.loads(found.read_text())
    assert (results["dataset"], results["category"], results["num_test_images"]) == ("mvtec", "alpha", 4)
    assert results["evaluation_protocol"]["image_size"] == [32, 32]


def test_sweep_writes_one_folder_per_job_and_a_summary(e2e_root: Path, tmp_path: Path) -> None:
    cats = list(E2E_CATEGORIES)
    args = [*_tiny_run_args(e2e_root, tmp_path / "out"), "trainer.max_epochs=1", f"data.category={','.join(cats)}"]
    proc = _run([*TRAIN, "-m", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = _results(tmp_path / "out")
    assert len(found) == 2
    assert len({p.parent for p in found}) == 2
    assert sorted(json.loads(p.read_text())["category"] for p in found) == sorted(cats)
    assert {p.parent.name for p in found} == set(cats)
    (summary,) = list((tmp_path / "out").rglob("summary.csv"))
    lines = summary.read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("method,backbone,dataset,category,image_auroc")
    assert "mean" in proc.stdout


def test_two_sweeps_started_together_do_not_collide(e2e_root: Path, tmp_path: Path) -> None:
    args = [*_tiny_run_args(e2e_root, tmp_path / "out"), "trainer.max_epochs=1", "data.image_size=32", "test=false"]
    procs = [
        subprocess.Popen(
            [*TRAIN, "-m", *args],
            env=_env(tmp_path),
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    sweeps = sorted((tmp_path / "out" / "demo" / "multiruns").iterdir())
    assert len(sweeps) == 2, sweeps


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["data=mvtec", "data.root=/does/not/exist"], "/does/not/exist"),
        (["data.category=no_such_category"], "no_such_category"),
        (["backbone.weights=imagenet"], "backbone.weights=none"),
    ],
)
def test_user_errors_are_one_line_without_traceback(
    e2e_root: Path, tmp_path: Path, override: list[str], expected: str
) -> None:
    proc = _run([*TRAIN, *_tiny_run_args(e2e_root, tmp_path / "out"), *override], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("kdad: error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
