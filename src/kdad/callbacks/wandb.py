"""Weights & Biases: a ``WandbLogger`` that names runs after what they train and logs the final
results (metrics, anomaly-map grid, a one-row results table, the output folder).

Naming (``conf/logger/wandb.yaml``): ``group`` = the study (``task_name`` unless
``logger.wandb.group`` is set), ``name`` = ``<method>-<backbone>-<category>``, ``tags`` =
``[method, backbone, dataset, category, *tags]``. Losses, the learning rate and the test
metrics reach W&B through Lightning's ``self.log``; the resolved config through
``log_hyperparams`` (kdad-train does it before training).

``wandb`` itself is imported only when the logger is created (``pip install 'kdad[wandb]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

#: results.json fields copied into the W&B run summary (besides every metric)
SUMMARY_FIELDS = (
    "weights",
    "num_train_images",
    "num_test_images",
    "epochs",
    "global_steps",
    "precision",
    "train_seconds",
    "inference_images_per_second",
    "output_dir",
    "checkpoint",
    "anomaly_map_grid",
)


def method_short_name(target: str) -> str:
    """``kdad.methods.ReverseDistillation`` -> ``rd`` (the class's ``method_name``); the last
    dotted component, lower-cased, when the class cannot be imported."""
    try:
        from hydra.utils import get_class

        return str(get_class(target).method_name)
    except (ImportError, AttributeError, ValueError):  # not importable, or no method_name
        return target.rsplit(".", 1)[-1].lower()


def run_tags(method: str, backbone: str, dataset: str, category: str, extra: Iterable[str] = ()) -> list[str]:
    """``[method, backbone, dataset, category, *extra]`` without duplicates, order kept."""
    tags: list[str] = []
    for tag in (method, backbone, dataset, category, *extra):
        text = str(tag)
        if text and text not in tags:
            tags.append(text)
    return tags


class KdadWandbLogger(WandbLogger):
    """``WandbLogger`` named after the run.

    Args:
        method: the method's ``_target_`` (``${method._target_}``) or its short name.
        backbone, dataset, category: the run's backbone name, ``data.format`` and category.
        extra_tags: more tags (the top-level ``tags`` list).
        name: the run name; ``None`` gives ``<method>-<backbone>-<category>``.
        **kwargs: everything else of :class:`lightning.pytorch.loggers.WandbLogger` and
            ``wandb.init`` (``project``, ``group``, ``entity``, ``save_dir``, ``mode``, ...).
    """

    def __init__(
        self,
        method: str,
        backbone: str,
        dataset: str,
        category: str,
        extra_tags: Sequence[str] = (),
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        short = method_short_name(method) if "." in method else method
        self.identity = {"method": short, "backbone": str(backbone), "dataset": str(dataset), "category": str(category)}
        tags = run_tags(short, backbone, dataset, category, extra_tags)
        super().__init__(name=name or f"{short}-{backbone}-{category}", tags=tags, **kwargs)

    @rank_zero_only
    def log_results(self, results: dict[str, Any]) -> None:
        """Final metrics and facts into the run summary; the anomaly-map grid as an image; one
        row (this category) of the study's results table (W&B joins the rows of a group)."""
        import wandb

        run = self.experiment
        metrics = {k: float(v) for k, v in (results.get("metrics") or {}).items()}
        summary: dict[str, Any] = {f"test/{k}": v for k, v in metrics.items()}
        for key in SUMMARY_FIELDS:
            if results.get(key) is not None:
                summary[key] = results[key]
        for key, value in (results.get("parameters") or {}).items():
            summary[f"parameters/{key}"] = value
        if results.get("output_dir"):
            summary["results_json"] = str(Path(results["output_dir"]) / "results.json")
        run.summary.update(summary)

        identity = [results.get(k) or self.identity.get(k) for k in ("method", "backbone", "dataset", "category")]
        columns = ["method", "backbone", "dataset", "category", *metrics, "output_dir"]
        payload: dict[str, Any] = {
            "results": wandb.Table(columns=columns, data=[[*identity, *metrics.values(), results.get("output_dir")]]),
        }
        grid = results.get("anomaly_map_grid")
        if grid and Path(grid).is_file():
            payload["test/anomaly_maps"] = wandb.Image(str(grid), caption="-".join(str(i) for i in identity))
        run.log(payload)
        log.info("W&B run %s: final metrics, results table%s logged", run.name, " and anomaly maps" if grid else "")
