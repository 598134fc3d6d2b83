"""A PNG of the synthetic anomalies a run trains on (clean image, augmented image, mask contour)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


class SyntheticAnomalyPreview(L.Callback):
    """At fit start, writes ``filename`` into the run folder for datamodules with synthesis.

    Rows are the first ``num_images`` training images exactly as epoch 0 synthesises them
    (same ``(seed, epoch, index)`` draws as the training loader). Columns: the clean image,
    the augmented image, and the augmented image with the anomaly mask's contour. Datamodules
    without ``synthesis`` (or without a datamodule) are left alone.
    """

    def __init__(self, num_images: int = 8, filename: str = "synthetic_anomalies.png") -> None:
        self.num_images = num_images
        self.filename = filename
        self.path: Path | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if getattr(datamodule, "synthesis", None) is None or not trainer.is_global_zero:
            return
        dataset = datamodule.synthetic_train_dataset  # type: ignore[union-attr]
        rows = [dataset[(i, 0)] for i in range(min(self.num_images, len(dataset)))]
        if not rows:
            return
        self.path = Path(trainer.default_root_dir) / self.filename
        render_synthetic_grid(rows, self.path)
        log.info("synthetic-anomaly preview written to %s", self.path)


def render_synthetic_grid(rows: list[dict[str, Any]], path: Path) -> None:
    """Draw rows of (clean, augmented, augmented + mask contour) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        clean = row["image"].permute(1, 2, 0).numpy()
        augmented = row["aug_image"].permute(1, 2, 0).clamp(0, 1).numpy()
        mask = row["aug_mask"][0].numpy()
        ax_row[0].imshow(clean)
        ax_row[0].set_title(Path(str(row["path"])).name, fontsize=8)
        ax_row[1].imshow(augmented)
        ax_row[1].set_title("synthetic anomaly", fontsize=8)
        ax_row[2].imshow(augmented)
        if mask.any():
            ax_row[2].contour(mask, levels=[0.5], colors="red", linewidths=1.0)
            ax_row[2].set_title(f"mask ({100 * float(mask.mean()):.1f} % of pixels)", fontsize=8)
        else:
            ax_row[2].set_title("no anomaly (empty mask)", fontsize=8)
        for ax in ax_row:
            ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
