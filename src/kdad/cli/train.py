"""``kdad-train``: compose the config, fit, test the last-epoch model, write results.json.

    kdad-train method=rd backbone=wide_resnet50_2 data=mvtec data.root=/data/mvtec data.category=bottle
    kdad-train -m data.category=bottle,cable          # a sweep: one output folder per job
"""

from __future__ import annotations

import logging
import time
from typing import Any

import hydra
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

log = logging.getLogger("kdad")

register_resolvers()


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job described by a composed ``train.yaml`` config."""
    output_dir = start_run(cfg)
    check_launch(cfg)
    finished = finished_results(cfg, output_dir)
    if finished is not None:
        return finished

    datamodule = instantiate_datamodule(cfg.data)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    trainer = build_trainer(cfg, model)
    apply_iteration_budget(model, datamodule, trainer)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)

    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_seconds = time.perf_counter() - start

    distributed = trainer.world_size > 1
    if distributed:
        # DDP: every rank holds the same weights now; evaluate on global rank 0 alone, so the
        # test set is seen exactly once (no DistributedSampler padding); other ranks stop here
        end_distributed(trainer, output_dir)
        if not trainer.is_global_zero:
            return {}
    if not cfg.get("test", True):
        return {}
    evaluator = single_process_trainer(cfg.trainer, trainer, trainer.callbacks, trainer.loggers) if distributed else trainer
    # the in-memory weights after the last epoch are the reported model (no selection)
    evaluator.test(model, datamodule=datamodule, verbose=False)
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
    if evaluator.is_global_zero:
        finish_run(results, output_dir, loggers=evaluator.loggers)
    return results


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    results = train(cfg)
    return results.get("metrics", {}).get("image_auroc")


if __name__ == "__main__":
    main()
