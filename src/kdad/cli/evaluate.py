"""``kdad-eval``: evaluate a trained checkpoint on a test set and write results.json.

kdad-eval ckpt=outputs/train/runs/<run>/checkpoints/last.ckpt
kdad-eval ckpt=... data_root=/data/mvtec category=cable
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from kdad.checkpoint import load_model
from kdad.cli.common import (
    build_trainer,
    check_single_device_evaluation,
    collect_results,
    finish_run,
    report_user_errors,
    start_run,
)
from kdad.config import (
    config_dir,
    instantiate_datamodule,
    register_resolvers,
)
from kdad.errors import KdadError

log = logging.getLogger("kdad")

register_resolvers()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt`` on the dataset in the checkpoint (or ``cfg.data``)."""
    output_dir = start_run(cfg)
    check_single_device_evaluation(cfg)
    model, meta = load_model(cfg.ckpt)
    overrides = {k: v for k, v in (("root", cfg.get("data_root")), ("category", cfg.get("category"))) if v is not None}
    if cfg.get("data") is not None:
        datamodule = instantiate_datamodule(cfg.data, **overrides)
    else:
        recorded = meta.get("datamodule")
        if not recorded:
            raise KdadError(
                f"checkpoint {cfg.ckpt} records no dataset; "
                "pass one, e.g. data=mvtec data.root=/data/mvtec data.category=bottle"
            )
        from kdad.data import AnomalyDataModule

        # testing needs no synthetic anomalies (and the texture folder may not exist here)
        recorded = {k: v for k, v in recorded.items() if k != "synthesis"}
        datamodule = AnomalyDataModule(**{**recorded, **overrides})
    trainer = build_trainer(cfg)
    trainer.test(model, datamodule=datamodule, verbose=False)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    results = collect_results(
        model=model,
        datamodule=datamodule,
        trainer=trainer,
        seed=cfg.get("seed"),
        output_dir=output_dir,
        train_seconds=None,
        config=resolved if isinstance(resolved, dict) else None,
        checkpoint=str(cfg.ckpt),
    )
    if trainer.is_global_zero:
        finish_run(results, output_dir, loggers=trainer.loggers)
    return results


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    return evaluate(cfg).get("metrics", {}).get("image_auroc")


if __name__ == "__main__":
    main()
