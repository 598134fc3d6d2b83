"""An opt-in readout of the papers' test-set epoch selection, labelled as such.

URD and RD++ report, for each category, the epoch whose *test-set* metrics were best (URD: the
largest ``pixel AUROC + PRO`` on MVTec, ``+ image AUROC`` on VisA; spec ``rd_urd.md`` §3.6).
kdad's reported model is always the last one (DESIGN promise 2). This callback records the
periodic test-set monitoring (``trainer=monitor``) and adds to ``results.json`` what the paper's
protocol would have reported, under ``test_set_selection_readout`` with a warning label. It is
optimistic by construction and only meant for comparisons with those papers' tables.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import lightning as L

from kdad.errors import KdadError

log = logging.getLogger(__name__)

LABEL = "OPTIMISTIC: epoch selected on the test set (paper protocol); not kdad's reported result"


class TestSetSelectionReadout(L.Callback):
    """Keep every monitored evaluation; report the one with the largest sum of ``criterion``.

    Args:
        criterion: metric names summed to pick the epoch (URD MVTec: pixel_auroc +
            rd_legacy_pro; URD VisA: image_auroc + pixel_auroc + rd_legacy_pro).
    """

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, criterion: Sequence[str] = ("pixel_auroc", "rd_legacy_pro")) -> None:
        if not criterion:
            raise KdadError("callbacks.test_set_selection_readout.criterion is empty; name at least one metric")
        self.criterion = [str(c) for c in criterion]
        self.history: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.history = []
        if not trainer.limit_val_batches:
            raise KdadError(
                "the test-set selection readout needs periodic test-set monitoring: add trainer=monitor "
                "(e.g. with trainer.check_val_every_n_epoch=1 as URD's script evaluates every epoch)"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {
            key[len("monitor/") :]: float(value)
            for key, value in trainer.callback_metrics.items()
            if key.startswith("monitor/")
        }
        missing = [c for c in self.criterion if c not in metrics]
        if missing:
            raise KdadError(
                f"test-set selection criterion {missing} is not among the monitored metrics "
                f"({', '.join(sorted(metrics)) or 'none'}); "
                "enable it (e.g. method.metrics.legacy_pro=true) or change the criterion"
            )
        self.history.append(
            {"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step), "metrics": metrics}
        )

    def results_section(self) -> dict[str, Any] | None:
        """What results.json records (``None`` before any evaluation)."""
        if not self.history:
            return None
        best = max(self.history, key=lambda entry: sum(entry["metrics"][c] for c in self.criterion))
        return {
            "label": LABEL,
            "criterion": " + ".join(self.criterion),
            "epoch": best["epoch"],
            "global_step": best["global_step"],
            "metrics": best["metrics"],
            "evaluations": len(self.history),
        }
