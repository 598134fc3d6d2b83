"""logger=wandb, offline only (never online): naming, what a run logs, failed jobs closed as failed.

wandb 0.31 writes an offline run as one ``run-<id>.wandb`` file (no wandb-summary.json) and has
no Python reader for it any more; :func:`read_records` reads it with wandb's own protobuf
definitions (``wandb.proto.wandb_internal_pb2.Record``) from the LevelDB-style log the file is
(7-byte ``:W&B`` header, 32 KiB blocks, records with a 7-byte header: crc32, length, type).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

pytest.importorskip("wandb")

from kdad.callbacks.wandb import KdadWandbLogger, method_short_name, run_tags
from kdad.cli.common import report_user_errors
from kdad.config import config_dir, instantiate_collection, register_resolvers
from kdad.data import generate_demo_dataset
from kdad.errors import KdadError

register_resolvers()

BLOCK = 32 * 1024


def read_records(path: Path) -> Iterator[Any]:
    """Every record of a ``.wandb`` run file, as ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, chunk = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        chunk = payload if kind in (1, 2) else chunk + payload  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            yield record


def _key(item: Any) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def summarise(path: Path) -> dict[str, Any]:
    """The run record, merged config, every history row, the final summary and the exit code."""
    run, config, history, summary, exit_code = None, {}, [], {}, None
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            history.append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return {"run": run, "config": config, "history": history, "summary": summary, "exit_code": exit_code}


def _offline_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)


def _compose(tmp_path: Path, overrides: list[str]):  # type: ignore[no-untyped-def]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}", "logger=wandb", *overrides])


# ---------------------------------------------------------------------------------------- naming
def test_method_short_name_and_tags() -> None:
    assert method_short_name("kdad.methods.ReverseDistillation") == "rd"
    assert method_short_name("somewhere.else.MyMethod") == "mymethod"
    assert run_tags("rd", "resnet18", "demo", "weave", ["demo", "study1"]) == [
        "rd",
        "resnet18",
        "demo",
        "weave",
        "study1",
    ]


def test_names_group_and_tags_from_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (logger,) = instantiate_collection(_compose(tmp_path, ["data.category=cable"]).logger)
    assert isinstance(logger, KdadWandbLogger)
    init = logger._wandb_init  # what wandb.init will receive
    assert init["name"] == "rd-wide_resnet50_2-cable"
    assert init["tags"] == ["rd", "wide_resnet50_2", "mvtec", "cable"]
    assert init["group"] == "train" and init["project"] == "kdad" and init["mode"] == "disabled"
    assert init["dir"] == str(tmp_path)

    cfg = _compose(tmp_path, ["task_name=rd_mvtec_study", "tags=[baseline]", "backbone=resnet18"])
    (logger,) = instantiate_collection(cfg.logger)
    assert logger._wandb_init["group"] == "rd_mvtec_study"
    assert logger._wandb_init["tags"] == ["rd", "resnet18", "mvtec", "bottle", "baseline"]
    (logger,) = instantiate_collection(
        _compose(tmp_path, ["logger.wandb.group=my_sweep", "logger.wandb.name=custom"]).logger
    )
    assert logger._wandb_init["group"] == "my_sweep" and logger._wandb_init["name"] == "custom"


# ------------------------------------------------------------------------------ closing the run
def _job(outcome: str, directory: Path):  # type: ignore[no-untyped-def]
    @report_user_errors
    def job() -> str:
        import wandb

        wandb.init(project="kdad-test", dir=str(directory))  # as KdadWandbLogger: dir = the run's folder
        if outcome == "user_error":
            raise KdadError("data.root=/nowhere does not exist")
        if outcome == "crash":
            raise RuntimeError("boom")
        return "done"

    return job


@pytest.mark.parametrize(("outcome", "exit_code"), [("ok", 0), ("user_error", 1), ("crash", 1)])
def test_every_job_closes_its_run_and_failures_are_marked(
    outcome: str, exit_code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    _offline_env(monkeypatch, tmp_path)
    job = _job(outcome, tmp_path)
    if outcome == "ok":
        assert job() == "done"
    elif outcome == "user_error":
        with pytest.raises(SystemExit) as stop:
            job()
        assert stop.value.code == 2
    else:
        with pytest.raises(RuntimeError):
            job()
    assert wandb.run is None, "the run was closed"
    assert _exit_code(tmp_path) == exit_code


def _exit_code(directory: Path, wait_seconds: float = 20.0) -> int | None:
    """The exit code recorded in the one offline run below ``directory`` (wandb's service may
    still be flushing the file for a moment after ``finish`` returns on a busy machine)."""
    import time

    deadline = time.monotonic() + wait_seconds
    while True:
        files = list(directory.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        code = summarise(files[0])["exit_code"] if files else None
        if code is not None or time.monotonic() > deadline:
            return code
        time.sleep(0.2)


# ------------------------------------------------------------------------- a real training run
@pytest.mark.slow
def test_offline_training_run_logs_config_losses_lr_metrics_grid_and_table(tmp_path: Path) -> None:
    root = generate_demo_dataset(
        tmp_path / "data", categories=["weave"], image_size=64, n_train=8, n_test_good=4, n_test_defect=4
    )
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb_dir"),
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "kdad.cli.train",
        "experiment=demo",
        "hydra.sweeper.params=null",
        f"data.root={root}",
        "data.category=weave",
        "data.image_size=32",
        "data.train_batch_size=4",
        "backbone.weights=none",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "callbacks.progress_bar=null",
        f"paths.log_dir={tmp_path / 'out'}",
        "print_config=false",
        "logger=wandb",
        "task_name=wandb_study",
        "tags=[smoke]",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_path,) = list((tmp_path / "out").rglob("results.json"))
    results = json.loads(results_path.read_text())
    run_dir = results_path.parent
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # inside the run's output folder
    logged = summarise(run_file)

    run = logged["run"]
    assert run.display_name == "rd-resnet18-weave"
    assert run.run_group == "wandb_study" and run.project == "kdad"
    assert list(run.tags) == ["rd", "resnet18", "demo", "weave", "smoke"]
    # the resolved config, including the output folder
    assert logged["config"]["paths"]["output_dir"] == str(run_dir)
    assert logged["config"]["method"]["optimizer"]["lr"] == 0.005
    assert logged["config"]["data"]["category"] == "weave"
    # losses and learning rate, per step
    losses = [row["train/loss_step"] for row in logged["history"] if "train/loss_step" in row]
    assert len(losses) == results["global_steps"] == 4
    assert [row["train/lr"] for row in logged["history"] if "train/lr" in row] == pytest.approx([0.005] * 4)
    assert any("train/loss_epoch" in row for row in logged["history"])
    # every final metric, equal to results.json
    for key, value in results["metrics"].items():
        assert logged["summary"][f"test/{key}"] == pytest.approx(value, abs=1e-6), key
    assert logged["summary"]["output_dir"] == str(run_dir)
    assert logged["summary"]["results_json"] == str(results_path)
    # the anomaly-map grid as an image and the one-row results table, with their files
    assert logged["summary"]["test/anomaly_maps/_type"] == "image-file"
    assert logged["summary"]["results/_type"] == "table-file"
    files = run_file.parent / "files" / "media"
    (image,) = list(files.glob("images/test/anomaly_maps_*.png"))
    assert image.stat().st_size > 10_000
    (table_file,) = list(files.glob("table/results_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["method", "backbone", "dataset", "category"]
    (row,) = table["data"]
    assert row[:4] == ["rd", "resnet18", "demo", "weave"] and row[-1] == str(run_dir)
    assert row[table["columns"].index("image_auroc")] == pytest.approx(results["metrics"]["image_auroc"])
    assert logged["exit_code"] == 0
