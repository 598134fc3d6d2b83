"""Sweep and launcher helpers (issue 3): skipping finished jobs, launch-safety checks, GPU slots.

Stubs: to be filled in by the launcher work. The train CLI already calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig


def finished_results(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """The results of an already finished job this run would repeat, or None (run it)."""
    return None


def check_launch(cfg: DictConfig) -> None:
    """Refuse launch combinations known to break (e.g. DDP re-launch inside a Hydra multirun)."""
