"""What the train and eval entry points share: error reporting, results assembly."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

import lightning as L
from omegaconf import DictConfig

from kdad.config import apply_runtime_settings, print_config_tree
from kdad.errors import KdadError
from kdad.results import evaluation_protocol, git_revision, package_versions, print_metrics_table, write_json_atomic

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
    always close the W&B run, even on failure."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except Exception as error:
            user_error = find_user_error(error)
            if user_error is None:
                raise
            print(f"kdad: error: {user_error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        finally:
            if "wandb" in sys.modules:
                import wandb

                if wandb.run is not None:
                    wandb.finish()

    return wrapper  # type: ignore[return-value]


def start_run(cfg: DictConfig) -> Path:
    """What every entry point does first: print the config tree (``print_config``), apply
    process settings, seed everything (``seed``). Returns the run's output folder."""
    if cfg.get("print_config"):
        print_config_tree(cfg)
    apply_runtime_settings(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    return Path(cfg.paths.output_dir)


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
) -> dict[str, Any]:
    """Everything results.json records about one run."""
    hparams = dict(model.hparams)
    metric_options = hparams.get("metrics") or {}
    counts = model.parameter_counts()
    images_per_second = model.inference_images / model.inference_seconds if model.inference_seconds > 0 else None
    grid = next((cb.path for cb in trainer.callbacks if getattr(cb, "path", None) is not None), None)
    return {
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
        "epochs": trainer.current_epoch if train_seconds is not None else None,
        "global_steps": trainer.global_step if train_seconds is not None else None,
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


def finish_run(results: dict[str, Any], output_dir: Path) -> Path:
    """Write results.json, print the metrics table and where to look."""
    path = output_dir / "results.json"
    write_json_atomic(path, results)
    print_metrics_table(results)
    log.info("results: %s", path)
    print(f"results: {path}")
    if results.get("anomaly_map_grid"):
        print(f"pictures: {results['anomaly_map_grid']}")
    return path
