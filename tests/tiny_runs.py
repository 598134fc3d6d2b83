"""The tiny end-to-end training runs whose learned quality the suite asserts, in one place.

Each :class:`TinyRun` is a real ``kdad-train`` (Hydra, subprocess) on kdad's procedural demo
set with a random-init ResNet-18 encoder: the tests run it once with the experiment's seed and
assert :attr:`TinyRun.bounds`; ``experiments/quality_bounds/measure.py`` runs the very same
definitions over several seeds and under both CPU kernel sets (the machine's default and
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) and prints the table from which each
bound was set (worst measurement minus a margin; the numbers are in each test's docstring and
in ``experiments/quality_bounds/README.md``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAIN = [sys.executable, "-m", "kdad.cli.train"]

#: the environment variables that make an AVX-512 machine use torch's and oneDNN's AVX2 kernels
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

#: the demo set most runs train on: one texture, 64 px, 24 normal training and 14 test images
WEAVE_64 = {"categories": ["weave"], "image_size": 64, "n_train": 24, "n_test_good": 6, "n_test_defect": 8}


@dataclass(frozen=True)
class TinyRun:
    """One tiny ``kdad-train`` run: the demo data it needs, its overrides, its asserted bounds."""

    name: str
    #: keyword arguments of :func:`kdad.data.generate_demo_dataset`
    demo: Mapping[str, Any]
    #: Hydra overrides on top of :func:`base_overrides`
    overrides: tuple[str, ...]
    #: lower bounds the tests assert on ``results.json``'s metrics (strictly greater)
    bounds: Mapping[str, float] = field(default_factory=dict)
    timeout: int = 600

    def override(self, key: str) -> str:
        """The value this run sets for ``key`` (the last one, as Hydra takes it)."""
        values = [o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0].lstrip("+") == key]
        if not values:
            raise KeyError(key)
        return values[-1]


def base_overrides(root: Path, out: Path) -> list[str]:
    """What every tiny run shares: the demo experiment without its sweep, CPU, no downloads."""
    return [
        "experiment=demo",
        "hydra.sweeper.params=null",
        f"data.root={root}",
        "data.category=weave",
        "trainer.accelerator=cpu",
        "backbone.weights=none",
        "callbacks.progress_bar=null",
        f"paths.log_dir={out}",
        "print_config=false",
    ]


#: RD, the suite's main end-to-end run (tests/test_e2e.py): 8 epochs of 3 batches at 64 px
RD = TinyRun(
    "rd",
    {**WEAVE_64, "categories": ["weave", "washer"]},
    ("data.image_size=64", "data.train_batch_size=8", "trainer.max_epochs=8"),
    {"image_auroc": 0.75, "pixel_auroc": 0.75},
)

#: DSKD (tests/test_dskd.py): 8 epochs of 3 batches at 64 px (2 epochs gave image AUROC 0.58-0.79)
DSKD = TinyRun(
    "dskd",
    WEAVE_64,
    ("method=dskd", "data.image_size=64", "data.train_batch_size=8", "trainer.max_epochs=8"),
    {"image_auroc": 0.8, "pixel_auroc": 0.8},
)

#: ADPS (tests/test_adps.py): k=2 (four 16-px patches, the smallest layer3 allows) at 32 px,
#: DRAEM synthesis with procedural textures, 16 epochs of 6 steps at lr 3e-4 (8 epochs at 1e-3
#: gave pixel AUROC 0.59-0.95; 16 epochs at 1e-3 collapsed on two seeds)
ADPS = TinyRun(
    "adps",
    WEAVE_64,
    (
        "method=adps",
        "data.image_size=32",
        "data.train_batch_size=4",
        "trainer.max_epochs=16",
        "method.k=2",
        "method.optimizer.lr=3e-4",
        "method.scheduler.milestones=[100]",
        "++anomaly_source=null",
    ),
    {"image_auroc": 0.8, "pixel_auroc": 0.65},
)

#: TDAD (tests/test_tdad.py): all three prongs, 4 epochs of 3 batches at 64 px, 8-px mask patches
TDAD = TinyRun(
    "tdad",
    WEAVE_64,
    ("method=tdad", "data.image_size=64", "data.train_batch_size=8", "trainer.max_epochs=4", "method.mask_patch=8"),
    {"image_auroc": 0.7, "pixel_auroc": 0.7},
)

#: URD (tests/test_urd.py): 48 iterations (16 epochs of 3 batches) at 32 px (URD's smallest size),
#: with the labelled test-set readout every 4 epochs (24 iterations gave pixel AUROC 0.73-0.89)
URD = TinyRun(
    "urd",
    {**WEAVE_64, "image_size": 32},
    (
        "method=urd",
        "data.image_size=32",
        "data.train_batch_size=8",
        "method.iterations=48",
        "callbacks=paper_readout",
        "trainer=monitor",
        "trainer.check_val_every_n_epoch=4",
    ),
    {"image_auroc": 0.75, "pixel_auroc": 0.7},
    timeout=900,
)

RUNS: dict[str, TinyRun] = {run.name: run for run in (RD, DSKD, ADPS, TDAD, URD)}


def run_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The subprocess environment: no weights to find or fetch, W&B off, unbuffered output."""
    return {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
        **(extra or {}),
    }


def demo_data(run: TinyRun, folder: Path) -> Path:
    """The run's demo set, generated into ``folder`` once (reused when already complete)."""
    from kdad.data import generate_demo_dataset

    return generate_demo_dataset(folder, **run.demo)


@dataclass(frozen=True)
class Trained:
    """What a tiny run left: its run folder, its results.json, and what it printed."""

    run_dir: Path
    results: dict[str, Any]
    stdout: str
    stderr: str

    @property
    def metrics(self) -> dict[str, float]:
        return self.results["metrics"]


def train(
    run: TinyRun,
    tmp_path: Path,
    *,
    seed: int | None = None,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    data: Path | None = None,
) -> Trained:
    """Train ``run`` in a subprocess below ``tmp_path``.

    ``seed`` overrides the experiment's seed (111), ``extra`` adds overrides, ``env`` adds
    environment variables (e.g. :data:`AVX2_KERNELS`), ``data`` reuses a generated demo set.
    """
    root = data if data is not None else demo_data(run, tmp_path / "data")
    out = tmp_path / "out"
    args = [*base_overrides(root, out), *run.overrides, *extra]
    if seed is not None:
        args.append(f"seed={seed}")
    proc = subprocess.run(
        [*TRAIN, *args],
        capture_output=True,
        text=True,
        env=run_env(tmp_path, env),
        timeout=run.timeout,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = sorted(out.rglob("results.json"))
    return Trained(found.parent, json.loads(found.read_text()), proc.stdout, proc.stderr)


def failed_bounds(run: TinyRun, metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics of ``run`` at or below their bound (empty when every bound holds)."""
    return {key: metrics[key] for key, bound in run.bounds.items() if not metrics[key] > bound}
