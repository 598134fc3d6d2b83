"""The opt-in, labelled readout of the papers' test-set epoch selection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdad.callbacks import TestSetSelectionReadout
from kdad.errors import KdadError


def _trainer(epoch: int, metrics: dict[str, float], limit_val_batches: float = 1.0) -> SimpleNamespace:
    return SimpleNamespace(
        current_epoch=epoch,
        global_step=10 * (epoch + 1),
        sanity_checking=False,
        limit_val_batches=limit_val_batches,
        callback_metrics={f"monitor/{k}": torch.tensor(v) for k, v in metrics.items()}
        | {"train/loss": torch.tensor(1.0)},
    )


def test_readout_picks_the_epoch_with_the_best_criterion_sum() -> None:
    readout = TestSetSelectionReadout(criterion=["pixel_auroc", "rd_legacy_pro"])
    readout.on_fit_start(_trainer(0, {}), None)  # type: ignore[arg-type]
    history = [
        {"image_auroc": 0.99, "pixel_auroc": 0.90, "rd_legacy_pro": 0.80},  # sum 1.70
        {"image_auroc": 0.80, "pixel_auroc": 0.95, "rd_legacy_pro": 0.85},  # sum 1.80 <- best
        {"image_auroc": 0.97, "pixel_auroc": 0.96, "rd_legacy_pro": 0.70},  # sum 1.66 (last)
    ]
    for epoch, metrics in enumerate(history):
        readout.on_validation_end(_trainer(epoch, metrics), None)  # type: ignore[arg-type]
    section = readout.results_section()
    assert section is not None
    assert section["epoch"] == 1 and section["global_step"] == 20 and section["evaluations"] == 3
    assert section["metrics"]["pixel_auroc"] == pytest.approx(0.95)
    assert "OPTIMISTIC" in section["label"] and section["criterion"] == "pixel_auroc + rd_legacy_pro"
    visa = TestSetSelectionReadout(criterion=["image_auroc", "pixel_auroc", "rd_legacy_pro"])
    for epoch, metrics in enumerate(history):
        visa.on_validation_end(_trainer(epoch, metrics), None)  # type: ignore[arg-type]
    assert visa.results_section()["epoch"] == 0  # type: ignore[index]


def test_readout_errors_are_one_line() -> None:
    readout = TestSetSelectionReadout()
    assert readout.results_section() is None
    with pytest.raises(KdadError, match="trainer=monitor"):
        readout.on_fit_start(_trainer(0, {}, limit_val_batches=0), None)  # type: ignore[arg-type]
    with pytest.raises(KdadError, match="rd_legacy_pro"):
        readout.on_validation_end(_trainer(0, {"pixel_auroc": 0.9}), None)  # type: ignore[arg-type]
    with pytest.raises(KdadError, match="criterion"):
        TestSetSelectionReadout(criterion=[])
