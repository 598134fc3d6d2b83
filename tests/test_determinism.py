"""Determinism (issue 10): on the CPU the same seed gives the same weights and metrics.

Across processes this is checked by tests/test_resume.py, whose uninterrupted run and
thrice-interrupted run must end bit-identical. Here: two runs one after the other in one process
(nothing left over from the first run may change the second), through kdad-train's ``train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch


def _train(demo: Path, out: Path) -> dict[str, Any]:
    from hydra import compose, initialize_config_dir

    from kdad.cli.train import train
    from kdad.config import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "experiment=demo",
                f"data.root={demo}",
                "data.category=weave",
                "data.image_size=32",
                "data.train_batch_size=2",
                "data.holdout_fraction=0",
                "trainer.max_epochs=2",
                "trainer.accelerator=cpu",
                "trainer.enable_model_summary=false",
                "backbone.weights=none",
                "callbacks.progress_bar=null",
                "callbacks.anomaly_map_grid=null",
                "++callbacks.visual_report=null",
                "logger=none",
                f"paths.output_dir={out}",
                f"paths.work_dir={out}",
                "print_config=false",
            ],
        )
    return train(cfg)


@pytest.mark.slow
@pytest.mark.numerics
def test_the_same_seed_gives_identical_weights_and_metrics(tmp_path: Path) -> None:
    from kdad.data import generate_demo_dataset

    demo = generate_demo_dataset(
        tmp_path / "demo", categories=["weave"], image_size=32, n_train=4, n_test_good=2, n_test_defect=4
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fast on a busy machine; two threads were checked by hand (docs/reliability.md)
    try:
        first, second = _train(demo, tmp_path / "one"), _train(demo, tmp_path / "two")
    finally:
        torch.set_num_threads(threads)
    assert first["metrics"] == second["metrics"] and first["global_steps"] == second["global_steps"] == 4
    weights = [
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in ("one", "two")
    ]
    changed = 0
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
        changed += int(value.dtype.is_floating_point and value.numel() > 1)
    assert changed > 50  # the comparison covered the trained weights, not only counters
