"""``kdad-train``: compose the config, fit, test the last-epoch model, write results.json.

    kdad-train method=rd backbone=wide_resnet50_2 data=mvtec data.root=/data/mvtec data.category=bottle
    kdad-train -m data.category=bottle,cable          # a sweep: one output folder per job

A run whose output folder already holds a checkpoint continues from it (``resume=auto``); a
stop signal writes one and exits (docs/reliability.md, :mod:`kdad.reliability`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kdad.cli.common import (
    apply_iteration_budget,
    build_trainer,
    collect_results,
    end_distributed,
    finish_run,
    report_user_errors,
    single_process_trainer,
    start_run,
)
from kdad.config import (
    config_dir,
    instantiate_datamodule,
    register_resolvers,
)
from kdad.launch import check_launch, finished_results
from kdad.reliability import (
    RESUME_CHECKPOINT,
    RunGuard,
    clear_failure,
    resumable_training_order,
    resume_checkpoint,
)

log = logging.getLogger("kdad")

register_resolvers()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed ``train.yaml`` config."""
    output_dir = start_run(cfg)
    check_launch(cfg)
    finished = finished_results(cfg, output_dir)
    if finished is not None:
        return finished
    clear_failure(output_dir)  # an earlier attempt's failed.json: this attempt writes its own

    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    datamodule = instantiate_datamodule(cfg.data)
    resumable_training_order(datamodule)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    guard = RunGuard(checkpoint_path(cfg, output_dir), resolved, cfg.get("stop_signals"))
    trainer = build_trainer(cfg, model, extra_callbacks=[guard])
    apply_iteration_budget(model, datamodule, trainer)
    # skip_finished=false on a finished job: train it again from scratch
    ckpt_path = resume_checkpoint(cfg, guard.checkpoint_path, finished=(output_dir / "results.json").is_file())
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    start = time.perf_counter()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        guard.stopped_by_lightning("training")
    train_seconds = time.perf_counter() - start
    guard.stop_if_requested(trainer)

    distributed = trainer.world_size > 1
    if distributed:
        # DDP: every rank holds the same weights now; evaluate on global rank 0 alone, so the
        # test set is seen exactly once (no DistributedSampler padding); other ranks stop here
        end_distributed(trainer, output_dir)
        if not trainer.is_global_zero:
            return {}
    if not cfg.get("test", True):
        return {}
    evaluator = (
        single_process_trainer(cfg.trainer, trainer, trainer.callbacks, trainer.loggers) if distributed else trainer
    )
    # the in-memory weights after the last epoch are the reported model (no selection)
    try:
        evaluator.test(model, datamodule=datamodule, verbose=False)
    except SIGTERMException:
        guard.stopped_by_lightning("the test")
    checkpoint = next((cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks), None)
    results = collect_results(
        model=model,
        datamodule=datamodule,
        trainer=evaluator,
        fit_trainer=trainer,
        seed=cfg.get("seed"),
        output_dir=output_dir,
        train_seconds=train_seconds,
        config=resolved,
        checkpoint=checkpoint or None,
    )
    results["resumes"] = guard.resumes  # each resume: from which epoch/step, when, after which signal
    if evaluator.is_global_zero:
        finish_run(results, output_dir, loggers=evaluator.loggers)
    return results


def checkpoint_path(cfg: DictConfig, output_dir: Path) -> Path:
    """The run's resumable checkpoint: the file the ``model_checkpoint`` callback writes every
    epoch (``<dirpath>/<filename>.ckpt``, conf/callbacks/default.yaml), else
    ``<output folder>/checkpoints/last.ckpt``. Signals write the same file."""
    entry = OmegaConf.select(cfg, "callbacks.model_checkpoint", default=None)
    if entry is not None and entry.get("dirpath") and entry.get("filename") and "{" not in str(entry.filename):
        return Path(str(entry.dirpath)) / f"{entry.filename}.ckpt"
    return output_dir / RESUME_CHECKPOINT


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    return results.get("metrics", {}).get("image_auroc")


if __name__ == "__main__":
    main()
