"""A PNG grid of test images with their anomaly maps and ground-truth masks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from kdad.data.batch import Batch

log = logging.getLogger(__name__)


def _defect_type(path: str) -> str:
    """The folder an image sits in (MVTec layout: test/<defect>/<file>)."""
    return Path(path).parent.name or "?"


class AnomalyMapGrid(L.Callback):
    """Collects up to ``max_images`` test samples, spread over defect types, and writes one PNG.

    Columns: the image, the anomaly map blended over it, the ground-truth mask. Maps share one
    colour scale (the test set's score range), so brighter means more anomalous across rows.
    """

    def __init__(self, max_images: int = 16, filename: str = "anomaly_maps.png", per_type: int = 2) -> None:
        self.max_images = max_images
        self.filename = filename
        self.per_type = per_type
        self.path: Path | None = None
        self._rows: list[dict[str, Any]] = []
        self._per_type_count: dict[str, int] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._rows = []
        self._per_type_count = {}

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "anomaly_map" not in outputs:
            return
        for i in range(len(batch)):
            if len(self._rows) >= self.max_images:
                return
            kind = _defect_type(batch.path[i]) if batch.path else str(int(batch.label[i]))
            if self._per_type_count.get(kind, 0) >= self.per_type:
                continue
            self._per_type_count[kind] = self._per_type_count.get(kind, 0) + 1
            mask = batch.mask[i]
            self._rows.append(
                {
                    "image": batch.image[i].detach().cpu(),
                    "map": outputs["anomaly_map"][i, 0].detach().float().cpu(),
                    "mask": (mask[0] if isinstance(mask, Tensor) and mask.dim() == 3 else mask).detach().float().cpu(),
                    "score": float(outputs["score"][i]),
                    "label": int(batch.label[i]),
                    "kind": kind,
                }
            )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._rows or not trainer.is_global_zero:
            return
        out_dir = Path(trainer.default_root_dir)
        self.path = out_dir / self.filename
        render_grid(self._rows, self.path)
        log.info("anomaly-map grid written to %s", self.path)


def render_grid(rows: list[dict[str, Any]], path: Path) -> None:
    """Draw rows of (image, map overlay, mask) with matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    maps = torch.stack([r["map"] for r in rows]) if len({tuple(r["map"].shape) for r in rows}) == 1 else None
    lo = float(maps.min()) if maps is not None else min(float(r["map"].min()) for r in rows)
    hi = float(maps.max()) if maps is not None else max(float(r["map"].max()) for r in rows)
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        image = row["image"]
        image = image.permute(1, 2, 0).numpy()
        if image.dtype != np.uint8:
            image = np.clip(image, 0, 1)
        ax_row[0].imshow(image)
        ax_row[0].set_title(f"{row['kind']}  (label {row['label']})", fontsize=8)
        ax_row[1].imshow(image)
        overlay = ax_row[1].imshow(row["map"].numpy(), cmap="jet", alpha=0.5, vmin=lo, vmax=hi)
        ax_row[1].set_title(f"anomaly map, score {row['score']:.3f}", fontsize=8)
        ax_row[2].imshow(row["mask"].numpy(), cmap="gray", vmin=0, vmax=1)
        ax_row[2].set_title("ground truth", fontsize=8)
        for ax in ax_row:
            ax.set_axis_off()
        fig.colorbar(overlay, ax=ax_row[1], fraction=0.046, pad=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
