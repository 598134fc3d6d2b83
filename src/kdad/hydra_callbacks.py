"""Hydra callbacks: the study report when a sweep ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kdad.report import collect, make_report, print_problems, print_report, runs_csv

log = logging.getLogger("kdad")


class SweepSummary(Callback):
    """At the end of a multirun: the ``kdad-report`` of the sweep folder (tables printed, files in
    ``<sweep>/report/``), ``summary.csv`` (every run's metrics, raw fractions) in the sweep folder,
    and the path of each job's anomaly-map pictures. A failure here never fails the sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            self._summarise(sweep_dir)
        except Exception:  # the jobs' results are safe; never fail the sweep here, say how to retry
            log.exception("the sweep report failed; retry with: kdad-report %s", sweep_dir)

    @staticmethod
    def _summarise(sweep_dir: Path) -> None:
        from rich.console import Console

        if not sweep_dir.is_dir():
            return
        collection = collect(sweep_dir)
        if not collection.runs:
            console = Console()
            console.width = max(console.width, 120)
            print_problems(collection, console)
            return
        (sweep_dir / "summary.csv").write_text(runs_csv(collection))
        report = make_report(sweep_dir, collection=collection)
        print_report(report)
        for run in collection.runs:
            grid = run.folder / "anomaly_maps.png"
            if grid.is_file():
                print(f"pictures ({run.category}): {grid}")
        print(f"summary: {sweep_dir / 'summary.csv'}")
