"""Hydra callbacks: a summary table when a sweep ends."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdad.results import METRIC_ORDER

log = logging.getLogger("kdad")


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per ``results.json`` below ``sweep_dir``: run identity and metrics."""
    rows = []
    for path in sorted(sweep_dir.rglob("results.json")):
        results = json.loads(path.read_text())
        row: dict[str, Any] = {
            "method": results.get("method"),
            "backbone": results.get("backbone"),
            "dataset": results.get("dataset"),
            "category": results.get("category"),
        }
        row.update({k: results.get("metrics", {}).get(k) for k in METRIC_ORDER})
        row["folder"] = str(path.parent)
        rows.append(row)
    return rows


#: short column headers so the table fits a terminal
SHORT_NAMES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1",
    "aupro": "AUPRO",
    "rd_legacy_pro": "RD-PRO",
}


def print_sweep_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    keys = [k for k in METRIC_ORDER if any(r.get(k) is not None for r in rows)]
    table = Table(title=title, caption="I = image, P = pixel; RD-PRO = the RD papers' per-image PRO")
    for column in ("method", "backbone", "category"):
        table.add_column(column, no_wrap=True)
    for key in keys:
        table.add_column(SHORT_NAMES.get(key, key), justify="right", no_wrap=True)

    def fmt(value: Any) -> str:
        return "-" if value is None else ("nan" if value != value else f"{value:.3f}")

    for row in rows:
        table.add_row(str(row["method"]), str(row["backbone"]), str(row["category"]), *(fmt(row[k]) for k in keys))
    if len(rows) > 1:
        means = [[r[k] for r in rows if r.get(k) is not None] for k in keys]
        table.add_row("mean", "", "", *(fmt(sum(v) / len(v)) if v else "-" for v in means), style="bold")
    console = Console()
    console.width = max(console.width, 120)  # rich assumes 80 columns when not on a terminal
    console.print(table)


class SweepSummary(Callback):
    """At the end of a multirun, print one table of every job's metrics and write
    ``summary.csv`` in the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = collect_sweep(sweep_dir)
        if not rows:
            return
        with (sweep_dir / "summary.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print_sweep_table(rows, title=f"sweep {sweep_dir}")
        for row in rows:
            grid = Path(row["folder"]) / "anomaly_maps.png"
            if grid.is_file():
                print(f"pictures ({row['category']}): {grid}")
        print(f"summary: {sweep_dir / 'summary.csv'}")
