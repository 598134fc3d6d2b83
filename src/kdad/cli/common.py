"""What the train and eval entry points share: error reporting (and closing W&B runs), trainer
checks, one-process evaluation after DDP training, results assembly."""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
import lightning as L
from omegaconf import DictConfig

from kdad.config import apply_runtime_settings, instantiate_collection, print_config_tree, quiet_third_party_notices
from kdad.errors import KdadError
from kdad.results import (
    evaluation_protocol,
    git_revision,
    package_versions,
    print_metrics_table,
    write_json_atomic,
)

log = logging.getLogger("kdad")

F = TypeVar("F", bound=Callable[..., Any])


def find_user_error(error: BaseException) -> KdadError | None:
    """The :class:`KdadError` behind ``error`` (Hydra wraps errors raised while instantiating)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KdadError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def report_user_errors(task: F) -> F:
    """Turn a :class:`KdadError` into one line on stderr and exit status 2 (no traceback);
    record any error in ``<output folder>/failed.json`` (:func:`record_failure`); always close
    the W&B run, marked failed (exit code 1) when the task raised. A stop on a signal
    (:class:`kdad.reliability.TrainingStopped`, a ``SystemExit``) is not a failure."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        failed = True
        try:
            result = task(*args, **kwargs)
            failed = False
            return result
        except Exception as error:
            record_failure(args[0] if args else kwargs.get("cfg"), error)
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"kdad: error: {user_error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            close_wandb_run(failed)

    return wrapper  # type: ignore[return-value]


def record_failure(cfg: Any, error: BaseException) -> None:
    """``failed.json`` in the run's output folder (``cfg.paths.output_dir``) on global rank 0:
    :func:`kdad.reliability.write_failure`. Never raises: the original error matters more."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from omegaconf import OmegaConf

    from kdad.reliability import write_failure

    if not isinstance(cfg, DictConfig) or getattr(rank_zero_only, "rank", 0) != 0:
        return
    try:
        output_dir = Path(str(OmegaConf.select(cfg, "paths.output_dir", throw_on_resolution_failure=False) or ""))
        if not str(output_dir) or str(output_dir) == ".":
            return
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation may be what failed: keep it unresolved
            config = OmegaConf.to_container(cfg, resolve=False)
        path = write_failure(output_dir, error, config if isinstance(config, dict) else None, run_identity(cfg))
        if path is not None:
            log.info("failure recorded in %s", path)
    except Exception as problem:  # noqa: BLE001
        log.warning("could not write failed.json (%s)", problem)


def run_identity(cfg: DictConfig) -> dict[str, str | None]:
    """method / backbone / dataset / category of a run, as kdad-report names them."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    def select(key: str) -> str | None:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        return None if value is None else str(value)

    method = None
    if HydraConfig.initialized():
        method = HydraConfig.get().runtime.choices.get("method")
    return {
        "method": method,
        "backbone": select("backbone.name"),
        "dataset": select("data.format"),
        "category": select("data.category"),
    }


def close_wandb_run(failed: bool) -> None:
    """Finish the process's W&B run, if any: exit code 1 marks it failed in the dashboard."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


def start_run(cfg: DictConfig) -> Path:
    """What every entry point does first: silence notices no kdad user can act on
    (:func:`kdad.config.quiet_third_party_notices`), print the config tree (``print_config``), check the
    trainer settings, apply process settings, seed everything (``seed``). Returns the run's
    output folder."""
    quiet_third_party_notices()
    if cfg.get("print_config"):
        print_config_tree(cfg)
    check_precision(cfg)
    apply_runtime_settings(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    return Path(cfg.paths.output_dir)


#: precisions that need a CUDA GPU (fp16 autocast with a gradient scaler)
GPU_ONLY_PRECISIONS = ("16-mixed", "16", "16-true")


def check_precision(cfg: DictConfig) -> None:
    """``trainer.precision=16-mixed`` on the CPU is an error (Lightning would silently switch to
    bf16-mixed, and results.json would not say what the user asked for)."""
    trainer = cfg.get("trainer")
    if not trainer:
        return
    precision = str(trainer.get("precision", "32-true"))
    accelerator = str(trainer.get("accelerator", "auto"))
    if precision not in GPU_ONLY_PRECISIONS:
        return
    import torch

    on_cpu = accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )
    if on_cpu:
        raise KdadError(
            f"trainer.precision={precision} needs a GPU (fp16 is not supported on the CPU); "
            "on the CPU use trainer.precision=bf16-mixed or 32-true"
        )


def check_single_device_evaluation(cfg: DictConfig) -> None:
    """kdad-eval runs on one device: a distributed test loop would repeat test images."""
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    strategy = str(trainer.get("strategy", "auto") or "auto")
    if "ddp" in strategy or int(trainer.get("num_nodes", 1) or 1) > 1 or str(devices) not in ("1", "auto"):
        raise KdadError(
            f"kdad-eval evaluates on one device (trainer.devices={devices}, trainer.strategy={strategy} "
            "would repeat test images across processes); use trainer.devices=1 without trainer=ddp"
        )


def build_trainer(cfg: DictConfig, model: Any | None = None, extra_callbacks: Sequence[Any] = ()) -> L.Trainer:
    """The run's Trainer from ``cfg.trainer`` with the callbacks and loggers groups (plus
    ``extra_callbacks``) and :func:`reliability_plugins` (atomic checkpoint writes).

    With ``trainer.strategy=ddp`` and a model whose training leaves parameters without gradients
    in a backward pass (``model.ddp_unused_parameters``: URD's separate teacher and student
    steps, RD's legacy conv4), DDP must look for unused parameters:
    the strategy becomes ``ddp_find_unused_parameters_true``."""
    callbacks = instantiate_collection(cfg.get("callbacks")) + list(extra_callbacks)
    loggers = instantiate_collection(cfg.get("logger"))
    overrides: dict[str, Any] = {"plugins": reliability_plugins(cfg)}
    strategy = cfg.trainer.get("strategy") if cfg.get("trainer") else None
    if strategy == "ddp" and bool(getattr(model, "ddp_unused_parameters", False)):
        overrides["strategy"] = "ddp_find_unused_parameters_true"
        log.info(
            "%s leaves parameters without gradients in some backward passes: "
            "trainer.strategy=ddp_find_unused_parameters_true",
            model.method_name,
        )
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    return trainer


def reliability_plugins(cfg: DictConfig) -> list[Any]:
    """``trainer.plugins`` plus :class:`kdad.reliability.AtomicCheckpointIO` (checkpoints are
    never half-written) unless a checkpoint IO is configured; in a SLURM job, Lightning's
    SLURM environment without its own auto-requeue (kdad's :class:`~kdad.reliability.RunGuard`
    checkpoints and requeues on SIGUSR1/SIGUSR2; see docs/reliability.md)."""
    from lightning.fabric.plugins import CheckpointIO
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    from kdad.reliability import AtomicCheckpointIO

    configured = cfg.trainer.get("plugins") if cfg.get("trainer") else None
    plugins = list(hydra.utils.instantiate(configured, _convert_="all") or []) if configured else []
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    if SLURMEnvironment.detect() and not any(isinstance(p, ClusterEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def apply_iteration_budget(model: Any, datamodule: Any, trainer: L.Trainer) -> int | None:
    """For methods whose recipe counts iterations (:meth:`AnomalyModule.planned_epochs`), set the
    trainer's epochs to the whole number of epochs that reaches the budget (no ``drop_last``;
    under DDP each process sees ``ceil(N / world_size)`` images). Returns the epochs set."""
    if model.planned_epochs(1, datamodule.category) is None:
        return None
    datamodule.prepare_data()  # the demo set must exist before its training images are counted
    per_process = math.ceil(int(datamodule.num_train) / max(1, int(trainer.world_size)))
    batches = max(1, math.ceil(per_process / int(datamodule.hparams["train_batch_size"])))
    epochs = model.planned_epochs(batches, datamodule.category)
    if epochs is None:
        return None
    trainer.fit_loop.max_epochs = int(epochs)
    log.warning(
        "%s trains for an iteration budget: %d batches per epoch -> %d epochs; trainer.max_epochs is ignored "
        "(set method.iterations, or method.iterations=null to use trainer.max_epochs)",
        model.method_name,
        batches,
        epochs,
    )
    return int(epochs)


def single_process_trainer(
    trainer_cfg: DictConfig, fitted: L.Trainer, callbacks: list[Any], loggers: list[Any]
) -> L.Trainer:
    """A one-device Trainer for evaluating a model trained with DDP on global rank 0.

    Under DDP, Lightning's test loop splits the test set with a ``DistributedSampler`` that
    repeats samples to even out the ranks, which biases AUROC and AU-PRO. kdad therefore ends
    the process group after ``fit`` (:func:`end_distributed`) and evaluates on one process, with
    the same accelerator, precision, callbacks and loggers. Test metrics are logged at the
    fitted trainer's last step.
    """
    evaluator: L.Trainer = hydra.utils.instantiate(
        trainer_cfg,
        devices=1,
        num_nodes=1,
        strategy="auto",
        sync_batchnorm=False,
        callbacks=callbacks,
        logger=loggers or False,
    )
    # log test metrics at the training's last step, not at step 0 (Lightning's own counter)
    loop = evaluator.fit_loop.epoch_loop
    if hasattr(loop, "_batches_that_stepped"):
        loop._batches_that_stepped = fitted.fit_loop.epoch_loop._batches_that_stepped
    return evaluator


def end_distributed(trainer: L.Trainer, output_dir: Path) -> None:
    """After a DDP ``fit``: check that every rank wrote into rank 0's output folder (warn if
    not), wait for all ranks, then destroy the process group so one process can evaluate
    alone (torchmetrics would otherwise try to gather from ranks that have left)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, str(output_dir))
        if trainer.is_global_zero and len(set(gathered)) > 1:
            log.warning(
                "the DDP processes used different output folders (%s); results are written to rank 0's only. "
                "Started by SLURM (one task per GPU)? export KDAD_RUN_DIR=<one folder> for all tasks",
                ", ".join(sorted(set(gathered))),
            )
        dist.barrier()
        dist.destroy_process_group()


def collect_results(
    *,
    model: Any,
    datamodule: Any,
    trainer: Any,
    seed: int | None,
    output_dir: Path,
    train_seconds: float | None,
    config: dict[str, Any] | None,
    checkpoint: str | None,
    fit_trainer: Any | None = None,
) -> dict[str, Any]:
    """Everything results.json records about one run.

    ``trainer`` ran the test; ``fit_trainer`` trained (defaults to ``trainer``; they differ
    after DDP training, which is evaluated by a one-process trainer).
    """
    fitted = fit_trainer if fit_trainer is not None else trainer
    hparams = dict(model.hparams)
    metric_options = hparams.get("metrics") or {}
    counts = model.parameter_counts()
    images_per_second = model.inference_images / model.inference_seconds if model.inference_seconds > 0 else None
    grid = next((cb.path for cb in trainer.callbacks if getattr(cb, "path", None) is not None), None)
    readout = next((cb.results_section() for cb in trainer.callbacks if hasattr(cb, "results_section")), None)
    results = {
        "metrics": dict(model.test_results),
        "method": model.method_name,
        "backbone": hparams.get("backbone"),
        "weights": getattr(model, "weights_source", None),
        "frozen_bn_calibrated": bool(getattr(model, "frozen_bn_calibrated", False)),
        "dataset": datamodule.dataset_name,
        "category": datamodule.category,
        "num_train_images": datamodule.num_train,
        "num_test_images": datamodule.num_test,
        "seed": seed,
        "epochs": fitted.current_epoch if train_seconds is not None else None,
        "global_steps": fitted.global_step if train_seconds is not None else None,
        "training_processes": fitted.world_size if train_seconds is not None else None,
        "precision": str(trainer.precision),
        "device": str(model.device),
        "parameters": counts,
        "train_seconds": train_seconds,
        "inference_images_per_second": images_per_second,
        "evaluation_protocol": evaluation_protocol(
            image_size=datamodule.image_size,
            mask_resolution=datamodule.hparams.get("mask_resolution", "input"),
            fpr_limit=float(metric_options.get("fpr_limit", 0.3)),
            legacy_pro=bool(metric_options.get("legacy_pro", True)),
        ),
        "versions": package_versions(),
        "git_revision": git_revision(),
        "output_dir": str(output_dir),
        "checkpoint": checkpoint,
        "anomaly_map_grid": str(grid) if grid else None,
        "config": config,
    }
    if readout is not None:
        results["test_set_selection_readout"] = readout
    if getattr(model, "test_curves", None) is not None:  # F1-optimal on the test set: optimistic, labelled so
        results["test_set_thresholds"] = model.test_curves.test_set_thresholds()
    if getattr(model, "normal_thresholds", None) is not None:
        results["normal_thresholds"] = model.normal_thresholds
    return results


def finish_run(results: dict[str, Any], output_dir: Path, loggers: Sequence[Any] = ()) -> Path:
    """Write results.json, hand the results to loggers that take them (W&B: summary, image,
    table), print the metrics table and where to look."""
    from kdad.reliability import clear_failure

    path = output_dir / "results.json"
    write_json_atomic(path, results)
    clear_failure(output_dir)  # an earlier attempt's failed.json
    for logger in loggers:
        if hasattr(logger, "log_results"):
            logger.log_results(results)
    print_metrics_table(results)
    readout = results.get("test_set_selection_readout")
    if readout:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in readout["metrics"].items())
        print(f"{readout['label']}: epoch {readout['epoch']} by {readout['criterion']}: {shown}")
    log.info("results: %s", path)
    print(f"results: {path}")
    if results.get("anomaly_map_grid"):
        print(f"pictures: {results['anomaly_map_grid']}")
    return path
