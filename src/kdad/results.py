"""results.json: what a run measured, on what, with which code (DESIGN §1, promise 2)."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

PACKAGES = ("kdad", "torch", "torchvision", "lightning", "hydra-core", "timm", "torchmetrics", "numpy", "scipy")

METRIC_ORDER = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "rd_legacy_pro",
)


def package_versions() -> dict[str, str]:
    versions: dict[str, str] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_revision() -> str:
    """The kdad source tree's commit (``+dirty`` with uncommitted changes), or ``unknown``."""
    source_dir = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source_dir, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source_dir,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def evaluation_protocol(image_size: Any, mask_resolution: str, fpr_limit: float, legacy_pro: bool) -> dict[str, Any]:
    """A plain description of how the numbers were computed."""
    return {
        "model_selection": "last epoch (no test-set selection)",
        "image_size": list(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        "mask_resolution": mask_resolution,
        "mask_binarisation": "bilinear resize, > 0.5" if mask_resolution == "input" else "native size, != 0",
        "image_score": "max of the smoothed anomaly map",
        "curves": "exact (every distinct score is a threshold)",
        "aupro": f"MVTec AD AU-PRO, 8-connected regions, global per-pixel FPR, integrated to {fpr_limit}, normalised",
        "rd_legacy_pro": "RD/URD official per-anomalous-image PRO (200 thresholds), reported separately"
        if legacy_pro
        else "not computed",
    }


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a reader (or a run restarted after a kill) sees the old file or the
    new one, never a truncated one: ``write(handle)`` fills a temporary file next to ``path``
    (``.<name>.<pid>.tmp``), which is flushed to disk (fsync) and renamed over ``path``. On any
    error, including a ``KeyboardInterrupt``, the temporary file is removed and ``path`` is left
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """``payload`` as indented JSON, written atomically (:func:`write_atomic`)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n"
    write_atomic(Path(path), lambda handle: handle.write(text.encode()))


def print_metrics_table(results: Mapping[str, Any]) -> None:
    """A rich table of the metrics on the console."""
    from rich.console import Console
    from rich.table import Table

    metrics: Mapping[str, float] = results.get("metrics", {})
    title = (
        f"{results.get('method', '?')} / {results.get('backbone', '?')} "
        f"on {results.get('dataset', '?')}:{results.get('category', '?')}"
    )
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in METRIC_ORDER:
        if key in metrics:
            value = metrics[key]
            table.add_row(key, "nan" if value != value else f"{value:.4f}")
    Console().print(table)
