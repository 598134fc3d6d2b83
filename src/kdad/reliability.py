"""Runs that survive kills and preemption; outputs that are never half-written (issue 10).

* :class:`AtomicCheckpointIO`: every Lightning checkpoint is written to a temporary file next to
  its target, flushed to disk and renamed over it (:func:`kdad.results.write_atomic`), so a run
  killed while saving leaves the previous checkpoint, never a truncated one.
* :class:`ResumableDataLoader`: the training loader's position (the state of its shuffling
  generator when the current pass began and how many batches of that pass were trained on) is
  part of every checkpoint, so a resumed run trains on the same batches in the same order as an
  uninterrupted one, also when it resumes from the middle of an epoch.
* :class:`RunGuard`: a callback that kdad-train always adds. On a stop signal (``stop_signals``,
  default SIGTERM, SIGUSR1, SIGUSR2) it lets the current training step finish, writes a
  resumable checkpoint, and exits with status 128 + the signal number; under SLURM the job is
  then requeued (see :meth:`RunGuard.hand_over`). Every checkpoint also records the random
  number generators' states, the resolved config and the earlier resumes.
* :func:`resume_checkpoint`: the rule that picks the checkpoint kdad-train continues from.
* :func:`write_failure`: ``failed.json`` in the output folder of a run that raised.

docs/reliability.md describes what is tested and what does not resume exactly.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch.utils.data import DataLoader

from kdad.errors import KdadError
from kdad.results import write_atomic, write_json_atomic

log = logging.getLogger("kdad")

#: where a run's resumable checkpoint lives, relative to its output folder (the default
#: ModelCheckpoint of conf/callbacks/default.yaml writes it at every epoch end)
RESUME_CHECKPOINT = Path("checkpoints") / "last.ckpt"
#: the key of kdad's run state in a Lightning checkpoint (base.py's model metadata is "kdad")
CHECKPOINT_KEY = "kdad_run"
#: ``resume`` values (YAML's true/false arrive as booleans)
RESUME_MODES = ("auto", "true", "false")
DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")
#: signals that SLURM sends ahead of a time limit (``--signal``); kdad requeues the job on them
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
FAILED_FILE = "failed.json"
RESULTS_FILE = "results.json"


# --------------------------------------------------------------------------------------------
# atomic checkpoints
# --------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoint IO, written atomically on local disks
    (:func:`kdad.results.write_atomic`: temporary file, fsync, rename). Remote paths
    (``s3://``, ...) keep Lightning's own fsspec transaction."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomic(Path(path), lambda handle: torch.save(checkpoint, handle))


# --------------------------------------------------------------------------------------------
# a training order that resumes exactly
# --------------------------------------------------------------------------------------------


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves in checkpoints and restores on resume
    (``state_dict`` / ``load_state_dict``, Lightning's stateful-loader protocol).

    The state is the loader's shuffling ``generator`` as it was when the current pass began,
    plus the number of batches of that pass already trained on (:attr:`batches_trained`,
    counted by :class:`RunGuard`). A resumed pass restores the generator, draws the same
    permutation and skips the batches already trained on; after a complete pass the state is
    the generator as it is now, so the next pass draws what an uninterrupted run would. Loaders
    without a generator (kdad's epoch-keyed sampler, whose order Lightning's ``set_epoch``
    restores) only skip. No new constructor: :func:`make_resumable` turns an existing
    DataLoader into one.
    """

    #: batches of the current pass trained on (RunGuard counts them; the loader cannot, as
    #: Lightning may fetch ahead)
    batches_trained: int = 0
    #: every batch of the current pass was trained on (set by RunGuard)
    pass_complete: bool = False
    _pass_started: bool = False
    _pass_start_state: torch.Tensor | None = None
    _pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return self._resumable_pass()

    def _resumable_pass(self) -> Iterator[Any]:
        # a generator: nothing is drawn before the first batch is asked for
        pending, self._pending = self._pending, None
        skip = 0
        if pending is not None:
            state = pending.get("generator")
            if self.generator is not None and state is not None:
                self.generator.set_state(state)
            skip = int(pending.get("skip", 0))
        self._pass_start_state = self.generator.get_state() if self.generator is not None else None
        self._pass_started = True
        self.batches_trained, self.pass_complete = skip, False
        iterator = super().__iter__()
        for _ in range(skip):  # the permutation is drawn at the first batch; skipped batches are loaded
            if next(iterator, None) is None:
                return
        yield from iterator

    def state_dict(self) -> dict[str, Any]:
        """``{"generator": ByteTensor | None, "skip": int}``: where the next pass starts."""
        if self.pass_complete or not self._pass_started:
            state = self.generator.get_state() if self.generator is not None else None
            return {"generator": state, "skip": 0}
        return {"generator": self._pass_start_state, "skip": int(self.batches_trained)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Applied at the next pass (Lightning calls this before it iterates)."""
        self._pending = dict(state_dict)


def make_resumable(loader: Any) -> Any:
    """``loader`` as a :class:`ResumableDataLoader` (same object, same settings) when it is a
    plain ``torch.utils.data.DataLoader``; anything else is returned unchanged."""
    if type(loader) is DataLoader:
        loader.__class__ = ResumableDataLoader
    elif not isinstance(loader, ResumableDataLoader):
        log.debug(
            "training loader %s is not a plain DataLoader: its position is not saved in checkpoints",
            type(loader).__name__,
        )
    return loader


def resumable_training_order(datamodule: L.LightningDataModule) -> None:
    """Make ``datamodule.train_dataloader()`` return :class:`ResumableDataLoader` objects, so
    that checkpoints hold the training order's position (kdad-train calls this once)."""
    build = datamodule.train_dataloader

    @functools.wraps(build)
    def train_dataloader() -> Any:
        return make_resumable(build())

    datamodule.train_dataloader = train_dataloader  # type: ignore[method-assign]


def resumable_loaders(trainer: L.Trainer) -> list[ResumableDataLoader]:
    """The trainer's training loaders that save their position."""
    try:
        loaders = trainer.train_dataloader
    except (AttributeError, RuntimeError):
        return []
    if isinstance(loaders, ResumableDataLoader):
        return [loaders]
    values = loaders.values() if isinstance(loaders, Mapping) else loaders if isinstance(loaders, (list, tuple)) else []
    return [loader for loader in values if isinstance(loader, ResumableDataLoader)]


def set_wrapped_sampler_epochs(trainer: L.Trainer) -> None:
    """Under DDP Lightning wraps a custom sampler (kdad's epoch-keyed sampler) in a
    ``DistributedSamplerWrapper`` and sets the wrapper's epoch; Lightning < 2.6.1 did not pass it
    on, so after a resume the wrapped sampler counted its passes from 0 again. Set it here."""
    for loader in resumable_loaders(trainer):
        wrapped = getattr(getattr(loader.sampler, "dataset", None), "_sampler", None)
        if callable(getattr(wrapped, "set_epoch", None)):
            wrapped.set_epoch(trainer.current_epoch)


# --------------------------------------------------------------------------------------------
# random number generators (plain types: checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The process's global generators: torch (CPU and every initialised CUDA device),
    NumPy's legacy global generator and Python's ``random``, as tensors, lists and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    version, internal, gauss_next = random.getstate()
    states["python"] = {"version": int(version), "state": list(internal), "gauss_next": gauss_next}
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` recorded (CUDA only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    cuda = list(states.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    numpy = states["numpy"]
    keys = np.asarray(
        numpy["keys"].numpy() if isinstance(numpy["keys"], torch.Tensor) else numpy["keys"], dtype=np.uint32
    )
    np.random.set_state((numpy["kind"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss_next"]))


# --------------------------------------------------------------------------------------------
# stop signals, run state in checkpoints
# --------------------------------------------------------------------------------------------


class TrainingStopped(SystemExit):
    """Training stopped on a signal after writing a resumable checkpoint; the process exits
    with status 128 + the signal number (143 for SIGTERM, 138 for SIGUSR1)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message


def parse_signals(names: Sequence[Any] | None) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", 10]`` -> signals; unknown names are a :class:`KdadError`."""
    parsed: list[signal.Signals] = []
    for name in names or ():
        try:
            if isinstance(name, int) or str(name).isdigit():
                value = signal.Signals(int(name))
            else:
                text = str(name).upper()
                value = signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
        except (KeyError, ValueError):
            raise KdadError(
                f"unknown signal {name!r} in stop_signals; use names such as SIGTERM, SIGUSR1, SIGUSR2"
            ) from None
        if value in (signal.SIGKILL, signal.SIGSTOP):
            raise KdadError(f"stop_signals cannot contain {value.name} (it cannot be caught); remove it")
        if value not in parsed:
            parsed.append(value)
    return parsed


def slurm_job_id(env: Mapping[str, str]) -> str | None:
    """The id ``scontrol requeue`` needs: ``<array job>_<task>`` for array tasks, else the job id."""
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return env.get("SLURM_JOB_ID") or None


def requeue_slurm_job(job_id: str) -> bool:
    """``scontrol requeue <job_id>``; True when SLURM accepted it (failures are logged)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("could not requeue SLURM job %s (%s): start it again to resume", job_id, error)
        return False
    if done.returncode != 0:
        log.warning(
            "scontrol requeue %s failed (%s): start it again to resume", job_id, (done.stderr or done.stdout).strip()
        )
        return False
    log.warning("requeued SLURM job %s: it resumes from the checkpoint when it runs again", job_id)
    return True


class RunGuard(L.Callback):
    """Stop cleanly on signals; keep what a resumed run needs in every checkpoint.

    Signals (``stop_signals``, while training): the handler only records the signal. At the
    end of the current training step (or, after the last step of an epoch, at the epoch's end,
    once the epoch-end monitoring has run) every process writes ``checkpoint_path`` (one
    collective ``trainer.save_checkpoint``; under DDP any process's signal stops all) and
    raises :class:`TrainingStopped`. Before that, :meth:`hand_over` gives the signal to the
    handler that was installed before training (submitit's, which requeues the job), or, for
    SIGUSR1/SIGUSR2 in a SLURM job started without submitit, requeues it with ``scontrol``.

    Checkpoints: ``checkpoint["kdad_run"]`` holds the global random generators' states and the
    training loaders' positions (:class:`ResumableDataLoader`, whose trained batches this
    callback counts), both restored on resume; the resolved ``config``
    (:func:`resume_checkpoint` refuses to resume a run of another config) and ``resumes``, the
    history of earlier resumes. (Lightning restores stateful loaders only when it resumes
    mid-epoch, hence the copy here; both restore the same state.)
    """

    def __init__(
        self,
        checkpoint_path: str | Path,
        config: Mapping[str, Any] | None = None,
        stop_signals: Sequence[Any] | None = DEFAULT_STOP_SIGNALS,
    ) -> None:
        self.checkpoint_path = Path(checkpoint_path)
        self.config = dict(config) if config is not None else None
        self.signals = parse_signals(stop_signals)
        self.received: int | None = None
        #: the earlier resumes of this run (from the checkpoint), then this one
        self.resumes: list[dict[str, Any]] = []
        self._before_fit: dict[int, Any] = {}
        self._replaced: dict[int, Any] = {}
        self._loader_states: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ signal handlers
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning installs its own SIGTERM (and, under SLURM, SIGUSR1) handlers after setup:
        # what is installed now is what was there before training (e.g. submitit's handlers)
        if stage == "fit" and _main_thread():
            self._before_fit = {int(s): signal.getsignal(s) for s in self.signals}
            self.received = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning restores a stateful loader itself only when it resumes mid-epoch; the loader
        # draws nothing before its first batch, so restoring its position here is in time
        for loader, state in zip(resumable_loaders(trainer), self._loader_states):
            loader.load_state_dict(state)
        self._loader_states = []
        set_wrapped_sampler_epochs(trainer)
        if not _main_thread():
            return
        for sig in self.signals:
            self._replaced[int(sig)] = signal.getsignal(sig)
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            log.warning("received %s: finishing the current training step, then writing a resumable checkpoint", name)
        else:
            log.warning(
                "received %s while stopping after %s: still finishing the current step",
                name,
                signal.Signals(self.received).name,
            )

    def _restore_handlers(self) -> None:
        if not _main_thread():
            return
        for signum, handler in self._replaced.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._replaced = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------ stopping
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        total = trainer.num_training_batches
        for loader in resumable_loaders(trainer):
            loader.batches_trained += 1
            loader.pass_complete = loader.batches_trained >= total
        last_of_epoch = batch_idx + 1 >= total
        if self._stop_requested(trainer) and not last_of_epoch:
            self._stop(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_wrapped_sampler_epochs(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the epoch's last step and its monitoring; the checkpoint is the epoch-end state
        # that ModelCheckpoint would have written next
        if self._stop_requested(trainer):
            self._stop(trainer)

    def _stop_requested(self, trainer: L.Trainer) -> bool:
        local = self.received is not None
        if trainer.world_size > 1:  # one tiny all-reduce per step: every process stops at the same step
            return bool(trainer.strategy.reduce_boolean_decision(local, all=False))
        return local

    def _stop(self, trainer: L.Trainer) -> None:
        signum = (
            self.received if self.received is not None else int(signal.SIGTERM)
        )  # SIGTERM: another process's signal
        trainer.save_checkpoint(self.checkpoint_path)
        name = signal.Signals(signum).name
        message = (
            f"stopped by {name} at epoch {trainer.current_epoch}, global step {trainer.global_step}; resumable "
            f"checkpoint: {self.checkpoint_path}. Run the same command again (same output folder) to continue"
        )
        if trainer.is_global_zero:
            log.warning(message)
            print(f"kdad: {message}", file=sys.stderr, flush=True)
            self.hand_over(signum)
        raise TrainingStopped(signum, message)

    def hand_over(self, signum: int) -> None:
        """After the checkpoint: the pre-training handler of ``signum`` runs (submitit's requeues
        the job and exits); without one, a SIGUSR1/SIGUSR2 in a SLURM job is requeued here."""
        previous = self._before_fit.get(int(signum))
        if callable(previous):
            log.info(
                "handing %s to the handler installed before training (%s)",
                signal.Signals(signum).name,
                getattr(previous, "__qualname__", previous),
            )
            previous(signum, None)
            return
        job = slurm_job_id(os.environ)
        if job is not None and signal.Signals(signum).name in REQUEUE_SIGNALS:
            requeue_slurm_job(job)

    def stop_if_requested(self, trainer: L.Trainer) -> None:
        """After ``fit``: raise :class:`TrainingStopped` when a signal arrived too late to stop
        training (after its last step; under DDP on any process): the checkpoint holds the
        finished training, and the test runs when the run is started again."""
        if not self._stop_requested(trainer):
            return
        if self.received is None:
            self.received = int(signal.SIGTERM)  # another process's signal
        name = signal.Signals(self.received).name
        message = (
            f"stopped by {name} after training, before the test; checkpoint: {self.checkpoint_path}. "
            "Run the same command again to test"
        )
        if trainer.is_global_zero:
            log.warning(message)
            print(f"kdad: {message}", file=sys.stderr, flush=True)
            self.hand_over(self.received)
        raise TrainingStopped(self.received, message)

    def stopped_by_lightning(self, stage: str) -> None:
        """Lightning's own SIGTERM handling ended ``stage`` (a SIGTERM during the test, or while
        kdad's handlers were not installed): raise :class:`TrainingStopped` (status 143)
        instead of Lightning's ``SIGTERMException``, which exits with status 0."""
        where = (
            f"the last checkpoint is {self.checkpoint_path}"
            if self.checkpoint_path.is_file()
            else "no checkpoint was written"
        )
        message = (
            f"stopped by SIGTERM during {stage}; {where}. Run the same command again (same output folder) to continue"
        )
        log.warning(message)
        print(f"kdad: {message}", file=sys.stderr, flush=True)
        raise TrainingStopped(int(signal.SIGTERM), message)

    # ------------------------------------------------------------------ checkpoint state
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": 1,
            "config": self.config,
            "rng": rng_states(),
            "loaders": [loader.state_dict() for loader in resumable_loaders(trainer)],
            "resumes": list(self.resumes),
            "saved_at": _now(),
            "stopped_by": signal.Signals(self.received).name if self.received is not None else None,
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if not isinstance(state, Mapping):
            log.warning(
                "the checkpoint has no kdad run state (random generators, earlier resumes): "
                "the resumed run may differ from an uninterrupted one"
            )
            return
        set_rng_states(state["rng"])
        self._loader_states = list(state.get("loaders") or [])
        self.resumes = [
            *state.get("resumes", []),
            {
                "epoch": int(checkpoint.get("epoch", -1)),
                "global_step": int(checkpoint.get("global_step", -1)),
                "checkpoint_saved_at": state.get("saved_at"),
                "stopped_by": state.get("stopped_by"),
                "resumed_at": _now(),
            },
        ]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# the resume rule
# --------------------------------------------------------------------------------------------


def resume_mode(value: Any) -> str:
    """``resume`` as one of :data:`RESUME_MODES` (booleans from YAML become "true"/"false")."""
    mode = str(value).lower() if isinstance(value, (bool, str)) else value
    if mode not in RESUME_MODES:
        raise KdadError(
            f"unknown resume={value!r}; use auto (resume when the output folder holds a checkpoint), true or false"
        )
    return str(mode)


def resume_checkpoint(cfg: Mapping[str, Any], checkpoint_path: Path, finished: bool = False) -> str | None:
    """The checkpoint ``kdad-train`` continues from, or None to train from scratch.

    * ``ckpt_path=<file>``: that file, always (the explicit form; no config check).
    * ``resume=auto`` (default): ``checkpoint_path`` (``<output folder>/checkpoints/last.ckpt``)
      when it exists. A file that cannot be read is reported and training starts from scratch.
      ``finished`` (the folder holds results.json, and ``skip_finished=false`` asked to train
      the job again): from scratch.
    * ``resume=true``: the checkpoint; a missing or unreadable one is an error.
    * ``resume=false``: never; training starts from scratch and overwrites the checkpoint.

    Resuming a checkpoint written with another config (keys other than paths, loggers,
    callbacks, ...: :data:`kdad.launch.IDENTITY_IGNORED_KEYS`) is an error. With
    ``skip_finished=true`` (default) a folder with results.json never gets here
    (:func:`kdad.launch.finished_results`).
    """
    from kdad.checkpoint import read_checkpoint
    from kdad.launch import config_differences, describe_differences

    explicit = cfg.get("ckpt_path")
    if explicit:
        return str(explicit)
    mode = resume_mode(cfg.get("resume", "auto"))
    if mode == "false" or (mode == "auto" and finished):
        return None
    path = Path(checkpoint_path)
    if not path.is_file():
        if mode == "true":
            raise KdadError(
                f"resume=true but {path} does not exist: run in the killed run's folder (hydra.run.dir=<folder> or "
                "KDAD_RUN_DIR=<folder>; sweeps: the same hydra.sweep.dir), or pass ckpt_path=<checkpoint>"
            )
        return None
    try:
        checkpoint = read_checkpoint(path)
    except KdadError as error:
        if mode == "true":
            raise
        log.warning("%s; resume=auto trains from scratch", error)
        return None
    state = checkpoint.get(CHECKPOINT_KEY)
    previous = state.get("config") if isinstance(state, Mapping) else None
    current = _plain_config(cfg)
    if isinstance(previous, Mapping) and current is not None:
        differences = config_differences(previous, current)
        if differences:
            raise KdadError(
                f"{path} holds an unfinished run of another config "
                f"({describe_differences(previous, current, differences)}): "
                "pass resume=false to train from scratch (overwriting it), ckpt_path=<file> to continue it anyway, "
                "or start a new study (another hydra.sweep.dir)"
            )
    message = (
        f"resuming from {path} "
        f"(written in epoch {checkpoint.get('epoch')} at global step {checkpoint.get('global_step')})"
    )
    log.warning(message)
    print(message, flush=True)
    return str(path)


def _plain_config(cfg: Any) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    if isinstance(cfg, Mapping) and not OmegaConf.is_config(cfg):
        return dict(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    return container if isinstance(container, dict) else None


# --------------------------------------------------------------------------------------------
# failed runs
# --------------------------------------------------------------------------------------------


def write_failure(
    output_dir: Path, error: BaseException, config: Mapping[str, Any] | None, identity: Mapping[str, Any] | None = None
) -> Path | None:
    """Write ``<output_dir>/failed.json`` for a run that raised ``error``: the error's type and
    one-line message, whether the user caused it, the traceback, the time, the run's identity
    (method, backbone, dataset, category: what kdad-report shows) and config. Nothing is
    written where ``results.json`` exists (a finished run's folder). Returns the path or None."""
    from kdad.cli.common import find_user_error  # lazy: kdad.cli.common imports this module

    output_dir = Path(output_dir)
    if (output_dir / RESULTS_FILE).exists():
        return None
    user_error = find_user_error(error)
    shown = user_error if user_error is not None else error
    message = " ".join(str(shown).split()) or type(shown).__name__
    payload: dict[str, Any] = {
        "status": "failed",
        "error": {"type": type(shown).__name__, "message": message},
        "user_error": user_error is not None,
        "time": _now(),
        **{k: v for k, v in (identity or {}).items() if v is not None},
        "output_dir": str(output_dir),
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "config": dict(config) if config is not None else None,
    }
    path = output_dir / FAILED_FILE
    write_json_atomic(path, payload)
    return path


def clear_failure(output_dir: Path) -> None:
    """Remove a stale ``failed.json`` (the job runs again)."""
    (Path(output_dir) / FAILED_FILE).unlink(missing_ok=True)
