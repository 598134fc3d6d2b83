"""Atomic outputs and failure records (issue 10): results.json and checkpoints are written to a
temporary file and renamed, so a killed run never leaves a truncated file; unreadable results
are re-run and reported, never trusted; a failed run leaves failed.json, which kdad-report lists
and which a re-run does not count as finished."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from kdad.cli.common import finish_run, report_user_errors
from kdad.errors import KdadError
from kdad.launch import finished_results
from kdad.reliability import AtomicCheckpointIO, TrainingStopped
from kdad.report import collect
from kdad.results import write_atomic, write_json_atomic


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    write_json_atomic(path, {"old": 1})

    def half_then_fail(handle: Any) -> None:
        handle.write(b'{"new": ')
        raise KeyboardInterrupt  # also an interrupt, not only an Exception

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, half_then_fail)
    assert json.loads(path.read_text()) == {"old": 1}
    assert _leftovers(tmp_path) == []
    write_json_atomic(path, {"new": 2})
    assert json.loads(path.read_text()) == {"new": 2} and _leftovers(tmp_path) == []


def test_a_writer_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    """SIGKILL while the new content is half written: the file still holds the old content
    (the killed process leaves its hidden ``.<name>.<pid>.tmp``, which nothing reads)."""
    path, marker = tmp_path / "results.json", tmp_path / "writing"
    path.write_text('{"old": 1}\n')
    code = (
        "import sys, time; from pathlib import Path; from kdad.results import write_atomic\n"
        "def slow(handle):\n"
        "    handle.write(b'{\"new\": ' + b' ' * 100000); handle.flush(); Path(sys.argv[2]).touch(); time.sleep(60)\n"
        "write_atomic(Path(sys.argv[1]), slow)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(marker)])
    deadline = time.monotonic() + 60
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the writer never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads(path.read_text()) == {"old": 1}
    (tmp,) = _leftovers(tmp_path)
    assert tmp.startswith(".results.json.") and tmp_path.joinpath(tmp).stat().st_size > 100000


class Unpicklable:
    def __reduce__(self) -> Any:
        raise RuntimeError("cannot pickle this")


def test_checkpoints_are_written_atomically(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"weights": torch.arange(3.0)}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):  # fails after the tensor was written
        io.save_checkpoint({"weights": torch.zeros(100_000), "bad": Unpicklable()}, path)
    assert torch.equal(io.load_checkpoint(path)["weights"], torch.arange(3.0))
    assert _leftovers(path.parent) == []


def test_the_trainer_writes_checkpoints_through_the_atomic_io() -> None:
    from hydra import compose, initialize_config_dir

    from kdad.cli.common import build_trainer
    from kdad.config import config_dir, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train", overrides=["trainer=cpu", "logger=none", "callbacks=none", "paths.output_dir=/tmp/unused"]
        )
    trainer = build_trainer(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# --------------------------------------------------------------------------------------------
# unreadable results, failed runs


def _cfg(output_dir: Path, **extra: Any) -> Any:
    return OmegaConf.create(
        {
            "paths": {"output_dir": str(output_dir)},
            "skip_finished": True,
            "seed": 1,
            "data": {"format": "demo", "category": "weave"},
            "backbone": {"name": "resnet18"},
            **extra,
        }
    )


def test_unreadable_results_are_trained_again_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = tmp_path / "weave"
    job.mkdir()
    (job / "results.json").write_text('{"metrics": {"image_auroc": 0.9')  # truncated (by hand: kdad never does this)
    with caplog.at_level("WARNING", logger="kdad"):
        assert finished_results(_cfg(job), job) is None
    assert "unreadable" in caplog.text
    (job / "results.json").write_text("[1, 2]")  # valid JSON, not a results object
    assert finished_results(_cfg(job), job) is None
    (problem,) = collect(tmp_path).problems
    assert problem.status == "failed" and "results.json unreadable" in problem.reason


def test_a_failed_run_writes_failed_json_that_the_report_lists_and_a_rerun_retries(tmp_path: Path) -> None:
    job = tmp_path / "weave"

    @report_user_errors
    def task(cfg: Any) -> None:
        raise ValueError("Invalid learning rate: -1.0\nsecond line")

    with pytest.raises(ValueError):
        task(_cfg(job))
    failed = json.loads((job / "failed.json").read_text())
    assert failed["error"] == {"type": "ValueError", "message": "Invalid learning rate: -1.0 second line"}
    assert failed["user_error"] is False and failed["status"] == "failed"
    assert "Traceback" in failed["traceback"] and "raise ValueError" in failed["traceback"]
    assert failed["config"]["seed"] == 1 and failed["time"].endswith("+00:00")
    assert (failed["dataset"], failed["category"], failed["backbone"]) == ("demo", "weave", "resnet18")

    (problem,) = collect(tmp_path).problems
    assert problem.status == "failed" and problem.reason == "ValueError: Invalid learning rate: -1.0 second line"
    assert (problem.dataset, problem.category) == ("demo", "weave")
    assert finished_results(_cfg(job), job) is None  # failed.json is not finished: the job runs again

    finish_run({"metrics": {"image_auroc": 0.5}, "config": {"seed": 1}}, job)  # the re-run succeeds
    assert not (job / "failed.json").exists()


def test_user_errors_are_recorded_and_stops_are_not(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    @report_user_errors
    def user_error(cfg: Any) -> None:
        raise KdadError("data.root=/nope does not exist; set data.root")

    with pytest.raises(SystemExit) as exit_info:
        user_error(_cfg(tmp_path / "a"))
    assert exit_info.value.code == 2 and "kdad: error: data.root=/nope" in capsys.readouterr().err
    failed = json.loads((tmp_path / "a" / "failed.json").read_text())
    assert failed["user_error"] is True and failed["error"]["type"] == "KdadError"

    @report_user_errors
    def stopped(cfg: Any) -> None:
        raise TrainingStopped(int(signal.SIGTERM), "stopped")

    with pytest.raises(SystemExit):
        stopped(_cfg(tmp_path / "b"))
    assert not (tmp_path / "b" / "failed.json").exists()  # a signal stop resumes; it is no failure

    finished = tmp_path / "c"
    write_json_atomic(finished / "results.json", {"metrics": {"image_auroc": 1.0}})
    with pytest.raises(SystemExit):
        user_error(_cfg(finished))
    assert not (finished / "failed.json").exists()  # a finished run's folder keeps its results alone
