"""Resume (issue 10): the resume rule, the resumable training order, stop signals, and one
end-to-end chain of real kdad-train processes that are stopped by SIGUSR1, SIGTERM and SIGKILL
and resumed, whose final weights and metrics must equal an uninterrupted run's exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kdad.data.synthesis import EpochKeySampler
from kdad.errors import KdadError
from kdad.reliability import (
    CHECKPOINT_KEY,
    ResumableDataLoader,
    RunGuard,
    TrainingStopped,
    make_resumable,
    parse_signals,
    resume_checkpoint,
    resume_mode,
    rng_states,
    set_rng_states,
    slurm_job_id,
)

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# the training order


def _batch(batch: Any) -> list[Any]:
    return batch.tolist() if isinstance(batch, torch.Tensor) else [tuple(int(v) for v in key) for key in batch]


def _passes(loader: DataLoader, counts: list[int], first_epoch: int = 0) -> list[list[Any]]:
    """One pass per entry of ``counts``, taking that many batches (``None``: all), as the
    trainer does: ``set_epoch`` first, trained batches counted as RunGuard counts them."""
    seen = []
    for epoch, count in enumerate(counts, start=first_epoch):
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for batch in loader:
            seen.append(_batch(batch))
            if isinstance(loader, ResumableDataLoader):
                loader.batches_trained += 1
                loader.pass_complete = loader.batches_trained >= len(loader)
            if count is not None and loader.batches_trained == count:
                break
    return seen


class Keys(torch.utils.data.Dataset):
    """Returns the sampler's key itself: ``(index, epoch)`` for the epoch-keyed sampler."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key: Any) -> Any:
        return key


def _shuffled() -> DataLoader:
    return DataLoader(list(range(10)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))


def _keyed() -> DataLoader:
    return DataLoader(Keys(), batch_size=3, sampler=EpochKeySampler(10, 7), collate_fn=lambda keys: keys)


@pytest.mark.parametrize("build", [_shuffled, _keyed], ids=["generator-shuffled", "epoch-keyed"])
@pytest.mark.parametrize("stop", [(1, 2), (1, 4), (2, 1)], ids=["mid-epoch", "epoch-end", "first-batch"])
def test_a_resumed_loader_continues_the_uninterrupted_order(build: Any, stop: tuple[int, int]) -> None:
    """Train 3 passes of 4 batches uninterrupted; then stop after ``stop = (epoch, batches of
    that epoch)``, save the state, build the loader anew (as a resumed process does), restore
    it and train to the end: the same batches in the same order."""
    full = _passes(make_resumable(build()), [None, None, None])
    assert len(full) == 12 and len({str(full[0:4]), str(full[4:8]), str(full[8:12])}) == 3  # passes differ
    epoch, done = stop
    first = make_resumable(build())
    before = _passes(first, [None] * epoch + [done])
    resumed = make_resumable(build())
    resumed.load_state_dict(first.state_dict())
    start = epoch if done < 4 else epoch + 1
    after = _passes(resumed, [None] * (3 - start), first_epoch=start)
    assert before + after == full


def test_the_wrapped_epoch_keyed_sampler_follows_the_trainer_epoch() -> None:
    """DDP wraps kdad's epoch-keyed sampler; after a resume at epoch 3 it must draw epoch 3's
    order, not restart its own pass count at 0."""
    from types import SimpleNamespace

    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    from kdad.reliability import set_wrapped_sampler_epochs

    inner = EpochKeySampler(10, 7)
    loader = make_resumable(
        DataLoader(
            Keys(),
            batch_size=5,
            sampler=DistributedSamplerWrapper(inner, num_replicas=2, rank=0, shuffle=False),
            collate_fn=lambda k: k,
        )
    )
    set_wrapped_sampler_epochs(SimpleNamespace(train_dataloader=loader, current_epoch=3))  # type: ignore[arg-type]
    assert {int(e) for batch in loader for _, e in batch} == {3}
    assert inner.order(3) != inner.order(0)


def test_only_plain_dataloaders_become_resumable() -> None:
    class Custom(DataLoader):
        pass

    custom = Custom(list(range(4)))
    assert make_resumable(custom) is custom and not isinstance(custom, ResumableDataLoader)
    plain = DataLoader(list(range(4)), batch_size=2)
    assert make_resumable(plain) is plain and isinstance(plain, ResumableDataLoader)
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3]] and len(plain) == 2


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    import random

    import numpy as np

    L.seed_everything(3)
    saved = rng_states()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save({"rng": saved}, tmp_path / "x.ckpt")
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)["rng"]
    torch.rand(5), np.random.rand(5), random.random()
    set_rng_states(loaded)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


# --------------------------------------------------------------------------------------------
# the resume rule


def _checkpoint(path: Path, config: dict[str, Any] | None, epoch: int = 1, step: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "kdad": {"format": 1},
            "state_dict": {},
            "epoch": epoch,
            "global_step": step,
            CHECKPOINT_KEY: {"config": config},
        },
        path,
    )
    return path


CONFIG = {"seed": 1, "method": {"lr": 0.005}, "paths": {"output_dir": "/a"}, "resume": "auto"}


def test_resume_rule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert resume_checkpoint(CONFIG, path) is None  # auto, nothing to resume
    with pytest.raises(KdadError, match=r"resume=true but .*last.ckpt does not exist"):
        resume_checkpoint({**CONFIG, "resume": True}, path)
    assert resume_checkpoint({**CONFIG, "ckpt_path": "/x.ckpt"}, path) == "/x.ckpt"  # explicit wins
    _checkpoint(path, {**CONFIG, "paths": {"output_dir": "/elsewhere"}, "resume": True})  # ignored keys differ
    assert resume_checkpoint(CONFIG, path) == str(path)
    assert resume_checkpoint({**CONFIG, "resume": False}, path) is None
    assert resume_checkpoint(CONFIG, path, finished=True) is None  # skip_finished=false: train the job again
    assert resume_checkpoint({**CONFIG, "resume": True}, path, finished=True) == str(path)
    _checkpoint(path, {**CONFIG, "method": {"lr": 0.1}})
    with pytest.raises(KdadError, match=r"another config \(method.lr: 0.1 -> 0.005\).*resume=false"):
        resume_checkpoint(CONFIG, path)
    path.write_bytes(b"truncated")
    with caplog.at_level("WARNING", logger="kdad"):
        assert resume_checkpoint(CONFIG, path) is None
    assert "trains from scratch" in caplog.text
    with pytest.raises(KdadError, match="could not be read"):
        resume_checkpoint({**CONFIG, "resume": "true"}, path)
    with pytest.raises(KdadError, match="unknown resume='maybe'"):
        resume_mode("maybe")


def test_signal_names_and_slurm_job_ids() -> None:
    assert parse_signals(["SIGTERM", "usr1", 12, "SIGTERM"]) == [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    with pytest.raises(KdadError, match="SIGKILL"):
        parse_signals(["SIGKILL"])
    with pytest.raises(KdadError, match="unknown signal 'SIGNOPE'"):
        parse_signals(["SIGNOPE"])
    assert slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "3"}) == "5_3"
    assert slurm_job_id({}) is None


def test_a_stop_hands_the_signal_to_the_previous_handler_or_requeues_under_slurm(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """submitit installs its own SIGUSR2 handler (requeue + exit) before training: after the
    checkpoint it must still run. Without one, a SLURM job is requeued on USR1/USR2 only."""
    guard = RunGuard(tmp_path / "last.ckpt")
    called: list[int] = []
    guard._before_fit = {int(signal.SIGUSR2): lambda signum, frame: called.append(signum)}
    guard.hand_over(int(signal.SIGUSR2))
    assert called == [signal.SIGUSR2]
    requeued: list[str] = []
    monkeypatch.setattr("kdad.reliability.requeue_slurm_job", requeued.append)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    guard._before_fit = {}
    guard.hand_over(int(signal.SIGTERM))
    assert requeued == []  # SIGTERM: preemption or scancel; SLURM decides
    guard.hand_over(int(signal.SIGUSR1))
    assert requeued == ["42"]
    stopped = TrainingStopped(int(signal.SIGTERM), "m")
    assert isinstance(stopped, SystemExit) and stopped.code == 143


def test_a_requeued_sweep_job_reruns_the_same_job_overrides() -> None:
    """hydra-submitit requeues a job (time-out, preemption) with ``checkpoint``: the same
    launcher call with the same arguments, so the same pinned hydra.sweep.dir and subdir
    (tests/test_launch.py checks that the sweeper pins them), so the same job folder."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = SlurmLauncher(submitit_folder="x")
    args = (["data.category=a", "hydra.sweep.dir='/s'", "hydra.sweep.subdir=a"], "hydra.sweep.dir", 3, "id", {})
    delayed = launcher.checkpoint(*args)
    assert delayed.function is launcher and delayed.args == args


# --------------------------------------------------------------------------------------------
# real runs: kill, signal, resume


class PauseAt(L.Callback):
    """Test helper, loaded by the kdad-train subprocesses (``+callbacks.pause._target_=
    test_resume.PauseAt``): at ``(epoch, batch)`` write ``marker`` and wait (up to
    ``timeout`` s) until kdad's RunGuard has received a signal, so that the test's signal
    lands exactly after that training step."""

    def __init__(self, epoch: int, batch: int, marker: str, timeout: float = 120.0) -> None:
        self.epoch, self.batch, self.marker, self.timeout = epoch, batch, marker, timeout

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if (trainer.current_epoch, batch_idx) != (self.epoch, self.batch):
            return
        guard = next(cb for cb in trainer.callbacks if isinstance(cb, RunGuard))
        Path(self.marker).write_text(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while guard.received is None and time.monotonic() < deadline:
            time.sleep(0.02)


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        TORCH_HOME=str(tmp / "torch_home"),
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        HYDRA_FULL_ERROR="1",
        OMP_NUM_THREADS="1",  # one thread: fast on a busy machine, and the same reductions in every run
        PYTHONPATH=os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")]),
    )
    return env


#: 4 training images in batches of 2 (2 steps per epoch), 4 epochs, StepLR halving every epoch
#: (a missed or repeated scheduler step changes the weights)
def _args(demo: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kdad.cli.train",
        "experiment=demo",
        "hydra.sweeper.params=null",
        f"data.root={demo}",
        "data.category=weave",
        "data.image_size=32",
        "data.train_batch_size=2",
        "data.holdout_fraction=0",
        "trainer.max_epochs=4",
        "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false",
        "backbone.weights=none",
        "callbacks.progress_bar=null",
        "callbacks.anomaly_map_grid=null",
        "++callbacks.visual_report=null",
        "logger=none",
        f"paths.log_dir={out}",
        "print_config=false",
        f"hydra.run.dir={out}",
        "method.scheduler={_target_:torch.optim.lr_scheduler.StepLR,_partial_:true,step_size:1,gamma:0.5}",
    ]


def _pause(epoch: int, batch: int, marker: Path) -> list[str]:
    return [
        "+callbacks.pause._target_=test_resume.PauseAt",
        f"+callbacks.pause.epoch={epoch}",
        f"+callbacks.pause.batch={batch}",
        f"+callbacks.pause.marker={marker}",
    ]


def _signal_at_pause(
    cmd: list[str], marker: Path, signum: int, tmp: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Start ``cmd``, wait for the pause marker, send ``signum``, wait for the end."""
    proc = subprocess.Popen(cmd, env=_env(tmp), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run ended (or hung) before pausing: rc={proc.returncode}\n{err[-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def demo32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kdad.data import generate_demo_dataset

    root = tmp_path_factory.mktemp("demo32")
    return generate_demo_dataset(root, categories=["weave"], image_size=32, n_train=4, n_test_good=2, n_test_defect=4)


@pytest.mark.slow
def test_stopped_killed_and_resumed_run_equals_the_uninterrupted_run(demo32: Path, tmp_path: Path) -> None:
    """A: uninterrupted. B: SIGUSR1 after step 1 of epoch 0 (mid-epoch checkpoint) -> resumed,
    SIGTERM after the last step of epoch 1 (checkpoint at the epoch's end) -> resumed, SIGKILL
    in epoch 3 (after ModelCheckpoint's epoch-2 checkpoint) -> resumed to the end. Each resume
    is automatic (same output folder). B's final weights, optimiser state and metrics equal A's
    exactly: same seed, two processes (determinism) and three resumes (exact resume)."""
    a_out, b_out = tmp_path / "A", tmp_path / "B"
    run_a = subprocess.Popen(
        _args(demo32, a_out),
        env=_env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    b1 = _signal_at_pause(
        _args(demo32, b_out) + _pause(0, 0, tmp_path / "p1"), tmp_path / "p1", signal.SIGUSR1, tmp_path
    )
    assert b1.returncode == 128 + signal.SIGUSR1, b1.stderr[-3000:]
    assert "kdad: stopped by SIGUSR1 at epoch 0, global step 1" in b1.stderr
    checkpoint = b_out / "checkpoints" / "last.ckpt"
    first = _state(checkpoint)
    assert (first["global_step"], first[CHECKPOINT_KEY]["stopped_by"]) == (1, "SIGUSR1")
    assert not (b_out / "results.json").exists() and not (b_out / "failed.json").exists()

    b2 = _signal_at_pause(
        _args(demo32, b_out) + _pause(1, 1, tmp_path / "p2"), tmp_path / "p2", signal.SIGTERM, tmp_path
    )
    assert b2.returncode == 128 + signal.SIGTERM, b2.stderr[-3000:]
    assert "resuming from" in b2.stdout and "kdad: stopped by SIGTERM at epoch 1, global step 4" in b2.stderr

    b3 = _signal_at_pause(
        _args(demo32, b_out) + _pause(3, 0, tmp_path / "p3"), tmp_path / "p3", signal.SIGKILL, tmp_path
    )
    assert b3.returncode == -signal.SIGKILL
    assert _state(checkpoint)["global_step"] == 6  # epoch 2's end (ModelCheckpoint)

    b4 = subprocess.run(
        _args(demo32, b_out), env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert b4.returncode == 0, b4.stderr[-3000:]
    _, err_a = run_a.communicate(timeout=300)
    assert run_a.returncode == 0, err_a[-3000:]

    results_a = json.loads((a_out / "results.json").read_text())
    results_b = json.loads((b_out / "results.json").read_text())
    assert results_b["metrics"] == results_a["metrics"]
    assert (
        (results_b["epochs"], results_b["global_steps"]) == (results_a["epochs"], results_a["global_steps"]) == (4, 8)
    )
    assert [r["stopped_by"] for r in results_b["resumes"]] == ["SIGUSR1", "SIGTERM", None]
    assert [r["global_step"] for r in results_b["resumes"]] == [1, 4, 6] and results_a["resumes"] == []
    final_a, final_b = _state(a_out / "checkpoints" / "last.ckpt"), _state(checkpoint)
    assert final_a["state_dict"].keys() == final_b["state_dict"].keys()
    for key, value in final_a["state_dict"].items():
        assert torch.equal(value, final_b["state_dict"][key]), key
    moments_a = final_a["optimizer_states"][0]["state"]
    moments_b = final_b["optimizer_states"][0]["state"]
    assert all(torch.equal(moments_a[i]["exp_avg_sq"], moments_b[i]["exp_avg_sq"]) for i in moments_a)
    assert final_a["lr_schedulers"] == final_b["lr_schedulers"]
