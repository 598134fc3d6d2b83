"""Measure the learned-quality bounds of kdad's test suite over seeds and CPU kernel sets.

The suite's tiny end-to-end runs (``tests/tiny_runs.py``: RD, DSKD, ADPS, TDAD, URD on the
procedural demo set with a random-init ResNet-18) each assert "image / pixel AUROC > bound".
A bound measured once, on one machine, fails on the next: float32 results differ in the last
bits between AVX2 and AVX-512 kernels, and a few training steps amplify that into a different
model, much as a different seed does. This script runs every definition over ``--seeds`` and
under both kernel sets (the machine's default, and torch's and oneDNN's AVX2 kernels through
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``), two runs at a time with one thread each
(as ``make test`` runs them), and prints one table per run with the minimum and the margin of
each asserted bound.

    .venv/bin/python experiments/quality_bounds/measure.py                 # everything
    .venv/bin/python experiments/quality_bounds/measure.py --runs dskd --seeds 111,1,2 \\
        --extra trainer.max_epochs=3                                      # try a variant

``--precision`` measures tests/test_precision.py's float32 model instead (torch seeds 0-4 by
default): its float32 AUROCs, the bf16 - float32 change and the tolerance derived from the
measured score / map change (kdad.metrics.auroc_change_bound).

Results go to ``experiments/quality_bounds/results/<host>-<date>-<time>.json`` (every run's
metrics, the CPU flags, package versions) and the tables to stdout (Markdown).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))

import tiny_runs  # noqa: E402 - the suite's own run definitions, found through the path above

KERNELS = {"default": {}, "avx2": tiny_runs.AVX2_KERNELS}
METRICS = ("image_auroc", "pixel_auroc")


def cpu_flags() -> list[str]:
    """The CPU's AVX-512 / bf16 / AMX flags (the ones that change torch's CPU kernels)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx512_bf16|avx512f|amx\w*|avx2)\b", text)))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def one(run: tiny_runs.TinyRun, seed: int, kernels: str, extra: list[str], data: Path) -> dict[str, Any]:
    """Train ``run`` once; its metrics or the error."""
    with tempfile.TemporaryDirectory(prefix=f"kdad-quality-{run.name}-") as tmp:
        env = {"OMP_NUM_THREADS": "1", **KERNELS[kernels]}
        try:
            results = tiny_runs.train(run, Path(tmp), seed=seed, extra=extra, env=env, data=data).results
        except (AssertionError, OSError, ValueError) as error:  # a failed run is a finding, not a crash
            return {"run": run.name, "seed": seed, "kernels": kernels, "error": str(error)[-500:]}
    return {
        "run": run.name,
        "seed": seed,
        "kernels": kernels,
        "metrics": {k: results["metrics"][k] for k in METRICS},
        "train_seconds": results["train_seconds"],
    }


def one_precision(seed: int, kernels: str) -> dict[str, Any]:
    """tests/test_precision.py's measure(seed) in a fresh process (the kernel variables are read
    when torch starts)."""
    code = f"import json, test_precision; print(json.dumps(test_precision.measure({seed})))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **KERNELS[kernels]}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=HERE.parents[1] / "tests",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return {"run": "precision", "seed": seed, "kernels": kernels, "error": proc.stderr[-500:]}
    return {"run": "precision", "seed": seed, "kernels": kernels, "metrics": json.loads(proc.stdout.splitlines()[-1])}


def precision_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (seed, kernel set) with every measured value."""
    keys = next((list(r["metrics"]) for r in rows if "metrics" in r), [])
    lines = [
        "**precision** (tests/test_precision.py: RD resnet18 4 epochs float32, evaluated in float32 and bf16)",
        "",
        "| seed | kernels | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in sorted(rows, key=lambda r: (r["seed"], r["kernels"])):
        cells = ["error"] * len(keys) if "error" in r else [f"{r['metrics'][k]:.4g}" for k in keys]
        lines.append(f"| {r['seed']} | {r['kernels']} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, ""])


def table(run: tiny_runs.TinyRun, rows: list[dict[str, Any]], extra: list[str]) -> str:
    """Markdown: one line per seed, one column per (metric, kernel set), then min / bound / margin."""
    kernels = [k for k in KERNELS if any(r["kernels"] == k for r in rows)]
    seeds = sorted({r["seed"] for r in rows}, key=lambda s: (s != 111, s))
    columns = [(m, k) for m in METRICS for k in kernels]
    lines = [
        f"**{run.name}** ({' '.join([*run.overrides, *extra])})",
        "",
        "| seed | " + " | ".join(f"{m} ({k})" for m, k in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    values: dict[tuple[str, str], list[float]] = {c: [] for c in columns}
    for seed in seeds:
        cells = []
        for metric, kernel in columns:
            (row,) = [r for r in rows if r["seed"] == seed and r["kernels"] == kernel]
            if "error" in row:
                cells.append("error")
                continue
            value = row["metrics"][metric]
            values[(metric, kernel)].append(value)
            cells.append(f"{value:.3f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    for label, pick in (("min", min), ("mean", statistics.fmean)):
        cells = [f"{pick(values[c]):.3f}" if values[c] else "-" for c in columns]
        lines.append(f"| **{label}** | " + " | ".join(cells) + " |")
    summary = []
    for metric in METRICS:
        measured = [v for k in kernels for v in values[(metric, k)]]
        if metric in run.bounds and measured:
            bound = run.bounds[metric]
            summary.append(f"{metric}: bound {bound}, worst {min(measured):.3f}, margin {min(measured) - bound:+.3f}")
    lines += ["", "; ".join(summary), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(tiny_runs.RUNS), help="comma-separated names of tests/tiny_runs.py")
    parser.add_argument("--seeds", default="111,1,2,3,4,5", help="comma-separated training seeds (111: the tests')")
    parser.add_argument("--kernels", default="default,avx2", help="default and/or avx2")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides added to every run (variants)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each single-threaded)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--precision", action="store_true", help="measure tests/test_precision.py's model instead")
    args = parser.parse_args()
    if args.precision:
        seeds = [int(s) for s in (args.seeds if args.seeds != parser.get_default("seeds") else "0,1,2,3,4").split(",")]
        specs = [(seed, k) for seed in seeds for k in args.kernels.split(",")]
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda spec: one_precision(*spec), specs))
        print(precision_table(rows))
        write_record(args.out, rows, [])
        return

    runs = [tiny_runs.RUNS[name] for name in args.runs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    kernels = args.kernels.split(",")
    work = Path(tempfile.mkdtemp(prefix="kdad-quality-data-"))
    data = {run.name: tiny_runs.demo_data(run, work / run.name) for run in runs}
    jobs = [(run, seed, k) for run in runs for seed in seeds for k in kernels]
    print(f"{len(jobs)} runs, {args.jobs} at a time; CPU {cpu_model()} {cpu_flags()}", flush=True)

    def job(spec: tuple[tiny_runs.TinyRun, int, str]) -> dict[str, Any]:
        run, seed, k = spec
        row = one(run, seed, k, args.extra, data[run.name])
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(job, jobs))

    print()
    for run in runs:
        print(table(run, [r for r in rows if r["run"] == run.name], args.extra))
    write_record(args.out, rows, args.extra)


def write_record(folder: Path, rows: list[dict[str, Any]], extra: list[str]) -> None:
    """Every measurement with the machine it ran on, as results/<host>-<date>-<time>.json."""
    import torch  # after the runs: only for the record

    record = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "extra": extra,
        "rows": rows,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{socket.gethostname()}-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(record, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()
