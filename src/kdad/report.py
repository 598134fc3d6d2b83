"""One report per study: every ``results.json`` below a folder, as one table per dataset.

``kdad-report <folder>`` (:mod:`kdad.cli.report`) and the sweep-end Hydra callback
(:mod:`kdad.hydra_callbacks`) both use this module; it is the one place that reads result trees.

* :func:`collect` walks a folder: every ``results.json`` is a run; every job folder without one
  (a Hydra job folder with ``.hydra/``, or a folder with ``failed.json``) is a :class:`Problem`, and
  so is every job a sweep's ``multirun.yaml`` asks for that has no job folder at all.
  Several runs of the same (method, backbone, dataset, category): the newest ``results.json``
  (file modification time) is used, the others are listed as superseded.
* :func:`build_table` makes one :class:`DatasetTable`: rows = categories, then group means
  (MVTec AD textures/objects) and the mean; columns = (method, backbone) x metric, plus the
  published numbers and ``ours - paper`` where :mod:`kdad.paper_results` has them.
* Units: every table value is in **percent** (100 x the fraction in ``results.json``, never
  rounded); differences are in percentage points. ``runs.csv`` keeps the raw fractions.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any, Literal

from hydra.errors import HydraException

from kdad.errors import KdadError
from kdad.paper_results import PaperTable, paper_table
from kdad.results import METRIC_ORDER

#: short metric names for headers
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

#: metrics in the per-dataset tables unless ``--metrics`` says otherwise
DEFAULT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "rd_legacy_pro")

#: metrics drawn as heatmaps in ``<dataset>.png``
PLOT_METRICS = ("image_auroc", "pixel_auroc")

MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")
MVTEC_OBJECTS = (
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
)

MEAN = "mean"
#: a failure reason longer than this is cut (the job's folder has the whole story)
REASON_CHARS = 300
UNITS_NOTE = "Values in percent (100 x the fractions in results.json; exact in the CSV, rounded for display)."
DIFF_NOTE = "Δ = ours - paper, in percentage points."

Status = Literal["failed", "missing", "not started"]


# --------------------------------------------------------------------------------------------
# collecting


@dataclass(frozen=True)
class Run:
    """One ``results.json``."""

    method: str
    backbone: str
    dataset: str
    category: str
    metrics: dict[str, float]
    path: Path
    mtime_ns: int

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.method, self.backbone, self.dataset, self.category)

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclass(frozen=True)
class Problem:
    """A job that has no usable results: failed, missing results.json, or never started."""

    status: Status
    folder: Path
    reason: str
    method: str | None = None
    backbone: str | None = None
    dataset: str | None = None
    category: str | None = None


@dataclass
class Collection:
    """What :func:`collect` found below ``root``."""

    root: Path
    runs: list[Run] = field(default_factory=list)
    """every readable results.json, sorted by path"""
    used: dict[tuple[str, str, str, str], Run] = field(default_factory=dict)
    """the newest run per (method, backbone, dataset, category)"""
    problems: list[Problem] = field(default_factory=list)

    @property
    def superseded(self) -> list[Run]:
        """Runs not used because a newer run of the same (method, backbone, dataset, category) exists."""
        return [run for run in self.runs if self.used[run.key] is not run]

    def metric_names(self) -> list[str]:
        """Every metric in any run: kdad's order first, then the rest alphabetically."""
        found = {name for run in self.runs for name in run.metrics}
        return [m for m in METRIC_ORDER if m in found] + sorted(found - set(METRIC_ORDER))


def _text(value: Any, default: str = "unknown") -> str:
    return default if value is None or value == "" else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _job_identity(folder: Path) -> dict[str, str | None]:
    """method/backbone/dataset/category of a Hydra job folder, from ``.hydra/`` (None where unknown)."""
    config = _read_yaml(folder / ".hydra" / "config.yaml")
    hydra = _read_yaml(folder / ".hydra" / "hydra.yaml")
    config = config if isinstance(config, dict) else {}
    runtime = ((hydra.get("hydra") or {}).get("runtime") or {}) if isinstance(hydra, dict) else {}
    choices = runtime.get("choices") or {}
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    backbone = config.get("backbone") if isinstance(config.get("backbone"), dict) else {}

    def plain(value: Any) -> str | None:  # unresolved interpolations say nothing
        return None if value is None or (isinstance(value, str) and "${" in value) else str(value)

    return {
        "method": plain(choices.get("method")),
        "backbone": plain(backbone.get("name")) or plain(choices.get("backbone")),
        "dataset": plain(data.get("format")) or plain(choices.get("data")),
        "category": plain(data.get("category")),
    }


def _trained_without_test(folder: Path) -> bool:
    config = _read_yaml(folder / ".hydra" / "config.yaml")
    return isinstance(config, dict) and config.get("test") is False


def _failure_reason(failed: dict[str, Any]) -> str:
    """A one-line reason from a ``failed.json`` (keys ``error``/``message``/``exception``/``type``)."""
    error = failed.get("error", failed.get("exception"))
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message")
    else:
        kind, message = failed.get("type"), error if error is not None else failed.get("message")
    text = ": ".join(str(part) for part in (kind, message) if part)
    text = " ".join(text.split())
    if len(text) > REASON_CHARS:
        text = text[: REASON_CHARS - 3] + "..."
    return text or "failed.json without an error message"


def _log_hint(folder: Path) -> str:
    logs = sorted(p.name for p in folder.glob("*.log"))
    return f" (log: {logs[0]})" if logs else ""


def _problem_for_job(folder: Path) -> Problem:
    """Why a job folder has no results.json."""
    identity = _job_identity(folder)
    failed_path = folder / "failed.json"
    if failed_path.is_file():
        try:
            failed = _read_json(failed_path)
            reason = _failure_reason(failed)
            for key in ("method", "backbone", "dataset", "category"):
                if failed.get(key) is not None:
                    identity[key] = str(failed[key])
        except (OSError, ValueError) as error:
            reason = f"failed.json unreadable ({error})"
        status: Status = "failed"
    elif _trained_without_test(folder):
        status, reason = "missing", "test=false: trained without evaluation, so no results.json"
    else:
        status, reason = (
            "missing",
            "no results.json: the job crashed, was killed or is still running" + _log_hint(folder),
        )
    return Problem(
        status=status,
        folder=folder,
        reason=reason,
        method=identity["method"],
        backbone=identity["backbone"],
        dataset=identity["dataset"],
        category=identity["category"],
    )


def _parse_overrides(lines: Iterable[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for line in lines:
        try:
            parsed.extend(parser.parse_overrides([str(line)]))
        except HydraException:  # an override we cannot parse is simply not checked
            continue
    return parsed


def _sweep_combinations(multirun_yaml: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """The swept keys of a sweep and every combination of their values it should run.

    Reads ``hydra.sweeper.params`` and the command-line task overrides of ``multirun.yaml``
    (command line wins); only plain lists, ``choice`` and ``range`` sweeps are understood."""
    content = _read_yaml(multirun_yaml)
    hydra = content.get("hydra") if isinstance(content, dict) else None
    if not isinstance(hydra, dict):
        return [], []
    params = (hydra.get("sweeper") or {}).get("params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] if isinstance(params, dict) else []
    lines += list(((hydra.get("overrides") or {}).get("task")) or [])
    swept: dict[str, list[str]] = {}
    for override in _parse_overrides(lines):
        key = override.key_or_group
        if not override.is_sweep_override():
            swept.pop(key, None)
            continue
        try:
            swept[key] = list(override.sweep_string_iterator())
        except HydraException:  # e.g. glob(), which needs the config groups
            swept.pop(key, None)
    keys = sorted(swept)
    return keys, list(product(*(swept[k] for k in keys)))


def _job_override_values(folder: Path, keys: Sequence[str]) -> tuple[str | None, ...]:
    lines = _read_yaml(folder / ".hydra" / "overrides.yaml")
    values: dict[str, str] = {}
    for override in _parse_overrides(lines if isinstance(lines, list) else []):
        if not override.is_sweep_override():
            values[override.key_or_group] = override.get_value_element_as_str()
    return tuple(values.get(k) for k in keys)


def _not_started(sweep_dir: Path, job_folders: Iterable[Path]) -> list[Problem]:
    """Jobs that ``multirun.yaml`` asks for but that have no job folder below ``sweep_dir``."""
    keys, combinations = _sweep_combinations(sweep_dir / "multirun.yaml")
    if not keys:
        return []
    jobs = [f for f in job_folders if f.is_relative_to(sweep_dir)]
    present = {_job_override_values(f, keys) for f in jobs}
    missing = [dict(zip(keys, c)) for c in combinations if c not in present]
    if not missing:
        return []
    # what is not swept is what every job of the sweep shares (when they agree)
    identities = [_job_identity(f) for f in jobs]
    shared = {
        field: values.pop() if len(values := {i[field] for i in identities}) == 1 else None
        for field in ("method", "backbone", "dataset", "category")
    }
    return [
        Problem(
            status="not started",
            folder=sweep_dir,
            reason="multirun.yaml asks for "
            + " ".join(f"{k}={v}" for k, v in values.items())
            + " but no job folder has it",
            method=values.get("method", shared["method"]),
            backbone=values.get("backbone", shared["backbone"]),
            dataset=values.get("data", shared["dataset"]),
            category=values.get("data.category", shared["category"]),
        )
        for values in missing
    ]


def collect(root: Path | str) -> Collection:
    """Every result, and every job without one, below ``root`` (any depth)."""
    root = Path(root)
    if not root.exists():
        raise KdadError(f"{root} does not exist: pass a run or sweep folder, e.g. outputs/train/multiruns/<id>")
    if not root.is_dir():
        raise KdadError(f"{root} is not a folder: pass the run or sweep folder that holds results.json files")
    root = root.absolute()
    found = Collection(root=root)
    result_folders: set[Path] = set()
    for path in sorted(root.rglob("results.json")):
        if not path.is_file():
            continue
        result_folders.add(path.parent)
        try:
            results = _read_json(path)
            metrics = results.get("metrics")
            if not isinstance(metrics, dict) or not metrics:
                raise ValueError("no metrics")
        except (OSError, ValueError) as error:
            found.problems.append(Problem("failed", path.parent, f"results.json unreadable or empty ({error})"))
            continue
        found.runs.append(
            Run(
                method=_text(results.get("method")),
                backbone=_text(results.get("backbone")),
                dataset=_text(results.get("dataset")),
                category=_text(results.get("category")),
                metrics={k: float(v) if v is not None else math.nan for k, v in metrics.items()},
                path=path,
                mtime_ns=path.stat().st_mtime_ns,
            )
        )
    for run in sorted(found.runs, key=lambda r: (r.mtime_ns, str(r.path))):
        found.used[run.key] = run  # the newest wins

    job_folders = {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    job_folders |= {p.parent for p in root.rglob("failed.json") if p.is_file()}
    for folder in sorted(job_folders - result_folders):
        found.problems.append(_problem_for_job(folder))
    for multirun in sorted(root.rglob("multirun.yaml")):
        found.problems.extend(_not_started(multirun.parent, job_folders))
    for i, problem in enumerate(found.problems):  # say when the table still has a result for it
        other = found.used.get((problem.method, problem.backbone, problem.dataset, problem.category))  # type: ignore[arg-type]
        if other is not None:
            reason = f"{problem.reason}; the table uses another run's result ({_rel(other.folder, root)})"
            found.problems[i] = replace(problem, reason=reason)
    return found


# --------------------------------------------------------------------------------------------
# tables


@dataclass(frozen=True)
class Column:
    """One table column: our metric for a (method, backbone), the paper's value, or the difference."""

    method: str
    backbone: str
    metric: str
    kind: Literal["ours", "paper", "diff"] = "ours"
    paper_name: str = ""
    """the published table's label, for paper and difference columns"""

    @property
    def csv_header(self) -> str:
        base = f"{self.method}/{self.backbone}/{self.metric}"
        return {"ours": f"{base} [%]", "paper": f"{base} paper [%]", "diff": f"{base} ours-paper [pp]"}[self.kind]

    def header_lines(self) -> tuple[str, str]:
        """Two header lines for Markdown and the console."""
        short = SHORT_NAMES.get(self.metric, self.metric)
        if self.kind == "ours":
            return f"{self.method}/{self.backbone}", short
        if self.kind == "paper":
            return self.paper_name, short
        return "Δ (pp)", short


@dataclass
class DatasetTable:
    """One dataset: rows = categories then mean rows; ``cells[row][column index]`` in percent."""

    dataset: str
    categories: list[str]
    mean_rows: list[str]
    columns: list[Column]
    cells: dict[str, list[float | None]]
    papers: list[PaperTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> list[str]:
        return self.categories + self.mean_rows


def known_categories(dataset: str) -> list[str]:
    """The dataset's category list from kdad's data config (``conf/data/<dataset>.yaml``), or []."""
    if dataset == "demo":
        from kdad.data.demo import DEMO_CATEGORIES

        return list(DEMO_CATEGORIES)
    try:
        from kdad.config import config_dir

        content = _read_yaml(Path(config_dir()) / "data" / f"{dataset}.yaml")
    except (FileNotFoundError, ValueError):
        return []
    categories = content.get("categories") if isinstance(content, dict) else None
    return [str(c) for c in categories] if isinstance(categories, list) else []


def category_groups(dataset: str) -> dict[str, tuple[str, ...]]:
    """Sub-means shown for a dataset: row label -> categories."""
    if dataset == "mvtec":
        return {"textures mean": MVTEC_TEXTURES, "objects mean": MVTEC_OBJECTS}
    if dataset == "demo":
        from kdad.data.demo import DEMO_OBJECTS, DEMO_TEXTURES

        return {"textures mean": DEMO_TEXTURES, "objects mean": DEMO_OBJECTS}
    return {}


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def build_table(collection: Collection, dataset: str, metrics: Sequence[str]) -> DatasetTable:
    """The table of one dataset over the used runs (see the module docstring for the layout)."""
    runs = [run for key, run in collection.used.items() if key[2] == dataset]
    found_categories = {run.category for run in runs}
    known = known_categories(dataset)
    categories = [c for c in known if c in found_categories] + sorted(found_categories - set(known))
    groups = {label: members for label, members in category_groups(dataset).items() if found_categories & set(members)}
    mean_rows = [*list(groups), MEAN]
    by_key = {(run.method, run.backbone, run.category): run for run in runs}
    models = sorted({(run.method, run.backbone) for run in runs})
    paper_for = {model: paper_table(*model, dataset) for model in models}

    columns: list[Column] = []
    for method, backbone in models:
        paper = paper_for[(method, backbone)]
        for metric in metrics:
            if not any(metric in run.metrics for run in runs if (run.method, run.backbone) == (method, backbone)):
                continue
            columns.append(Column(method, backbone, metric))
            if paper is not None and metric in paper.metric_names:
                columns += [Column(method, backbone, metric, kind, paper.name) for kind in ("paper", "diff")]

    def cell(column: Column, category: str) -> float | None:
        run = by_key.get((column.method, column.backbone, category))
        mine = None if run is None or column.metric not in run.metrics else 100.0 * run.metrics[column.metric]
        if column.kind == "ours":
            return mine
        theirs = paper_for[(column.method, column.backbone)].value(category, column.metric)  # type: ignore[union-attr]
        if column.kind == "paper":
            return theirs
        return None if mine is None or theirs is None else mine - theirs

    cells: dict[str, list[float | None]] = {row: [] for row in categories + mean_rows}
    members = {**groups, MEAN: tuple(categories)}
    for column in columns:
        for category in categories:
            cells[category].append(cell(column, category))
        for label in mean_rows:
            averaged = [c for c in categories if c in members[label]]
            if column.kind != "ours":  # paper and difference means: where we and the paper both have a value
                averaged = [c for c in averaged if cell(replace(column, kind="diff"), c) is not None]
            cells[label].append(_mean(cell(column, c) for c in averaged))

    papers = [paper for paper in paper_for.values() if paper is not None]
    table = DatasetTable(dataset, categories, mean_rows, columns, cells, papers)
    table.notes = _table_notes(collection, table, models, known)
    return table


def _table_notes(
    collection: Collection, table: DatasetTable, models: list[tuple[str, str]], known: list[str]
) -> list[str]:
    notes = [UNITS_NOTE]
    for method, backbone in models:
        have = {c for (m, b, d, c) in collection.used if (m, b, d) == (method, backbone, table.dataset)}
        if known and set(known) - have:
            missing = [c for c in known if c not in have]
            notes.append(
                f"{method}/{backbone}: {len(have & set(known))} of {len(known)} {table.dataset} categories "
                f"(no result for {', '.join(missing)}); its mean rows average the categories it has."
            )
    if table.papers:
        notes[0] += " " + DIFF_NOTE
    for paper in table.papers:
        notes.append(f"{paper.name}: {paper.citation} (source: {paper.source}).")
        notes.extend(paper.notes)
        published = ", ".join(
            f"{row} " + " / ".join(f"{v:.1f}" for v in values.values()) for row, values in paper.published_means.items()
        )
        if published:
            notes.append(
                f"Paper mean rows average the paper's per-category values over the categories we have "
                f"(published {', '.join(paper.metric_names.values())}: {published})."
            )
    for run in collection.superseded:
        if run.dataset == table.dataset:
            newer = collection.used[run.key]
            notes.append(
                f"{run.method}/{run.backbone} {run.category}: several runs; "
                f"using the newest ({_rel(newer.folder, collection.root)}), "
                f"not {_rel(run.folder, collection.root)}."
            )
    notes.extend(
        f"{problem.status}: {_describe(problem)} in {_rel(problem.folder, collection.root)}: {problem.reason}."
        for problem in collection.problems
        if problem.dataset == table.dataset
    )
    return notes


def build_tables(collection: Collection, metrics: Sequence[str] | None = None) -> list[DatasetTable]:
    """One table per dataset, datasets sorted by name."""
    metrics = list(metrics) if metrics else list(DEFAULT_METRICS)
    return [build_table(collection, dataset, metrics) for dataset in sorted({key[2] for key in collection.used})]


def resolve_metrics(collection: Collection, requested: Sequence[str] | None) -> list[str]:
    """``--metrics``: None -> the defaults, ``all`` -> every metric found; unknown names are errors."""
    available = collection.metric_names()
    if not requested:
        return [m for m in DEFAULT_METRICS if m in available] or available
    if list(requested) == ["all"]:
        return available
    unknown = [m for m in requested if m not in available]
    if unknown:
        raise KdadError(
            f"--metrics {' '.join(unknown)}: not in any results.json below {collection.root}; "
            f"available: {' '.join(available)} (or all)"
        )
    return list(requested)


# --------------------------------------------------------------------------------------------
# formatting and files


def _rel(path: Path, root: Path) -> str:
    try:
        relative = path.relative_to(root)
    except ValueError:
        return str(path)
    return str(relative) if str(relative) != "." else str(path)


def _describe(problem: Problem) -> str:
    parts = [problem.method, problem.backbone, problem.dataset, problem.category]
    known = [p for p in parts if p]
    return "/".join(known) if known else "a job"


def format_value(value: float | None, column: Column | None = None, decimals: int = 1) -> str:
    """A cell for display: fixed decimals, ``+`` on differences, ``n/a`` when absent."""
    if value is None:
        return "n/a"
    if math.isnan(value):
        return "nan"
    return f"{value:+.{decimals}f}" if column is not None and column.kind == "diff" else f"{value:.{decimals}f}"


def table_csv(table: DatasetTable) -> str:
    """The table as CSV text: exact values (Python's shortest round-trip repr), empty = no value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *(c.csv_header for c in table.columns)])
    for row in table.rows:
        writer.writerow([row, *("" if v is None else repr(v) for v in table.cells[row])])
    return buffer.getvalue()


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def table_markdown(table: DatasetTable, decimals: int = 1, image: str | None = None) -> str:
    """The table as a Markdown section (title, table, notes, optional picture)."""
    headers = ["category"] + [" ".join(c.header_lines()) for c in table.columns]
    lines = [f"## {table.dataset}", "", "| " + " | ".join(_md_escape(h) for h in headers) + " |"]
    lines.append("|" + "---|" + "---:|" * len(table.columns))
    for row in table.rows:
        cells = [format_value(v, c, decimals) for v, c in zip(table.cells[row], table.columns)]
        label = f"**{row}**" if row in table.mean_rows else row
        lines.append("| " + " | ".join(_md_escape(x) for x in [label, *cells]) + " |")
    lines.append("")
    lines += [f"- {_md_escape(note)}" for note in table.notes]
    if image:
        lines += ["", f"![{table.dataset}]({image})"]
    return "\n".join(lines) + "\n"


def runs_csv(collection: Collection) -> str:
    """Every run found, one line each, raw fractions as in results.json; ``used`` says which the tables use."""
    metrics = collection.metric_names()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "backbone", "dataset", "category", *metrics, "used", "folder"])
    for run in collection.runs:
        used = "yes" if collection.used[run.key] is run else "no (a newer run exists)"
        writer.writerow(
            [
                *run.key,
                *("" if run.metrics.get(m) is None else repr(run.metrics[m]) for m in metrics),
                used,
                str(run.folder),
            ]
        )
    return buffer.getvalue()


def problems_csv(collection: Collection) -> str:
    """Every job without usable results."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["status", "method", "backbone", "dataset", "category", "folder", "reason"])
    for p in collection.problems:
        writer.writerow(
            [p.status, p.method or "", p.backbone or "", p.dataset or "", p.category or "", str(p.folder), p.reason]
        )
    return buffer.getvalue()


def plot_heatmaps(collection: Collection, dataset: str, path: Path, decimals: int = 1) -> Path | None:
    """``path``: one annotated heatmap per :data:`PLOT_METRICS` (categories x method/backbone, plus the
    paper's column where it exists). None when the dataset has none of those metrics."""
    table = build_table(collection, dataset, [m for m in PLOT_METRICS if m in collection.metric_names()])
    metrics = [m for m in PLOT_METRICS if any(c.metric == m for c in table.columns)]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    panels = []
    for metric in metrics:
        indices = [i for i, c in enumerate(table.columns) if c.metric == metric and c.kind != "diff"]
        labels = ["\n".join(table.columns[i].header_lines()[0]) for i in indices]
        data = np.array(
            [[np.nan if table.cells[r][i] is None else table.cells[r][i] for i in indices] for r in table.rows],
            dtype=float,
        )
        panels.append((metric, labels, data))
    n_rows = len(table.rows)
    width = sum(1.6 + 1.1 * len(labels) for _, labels, _ in panels) + 1.5
    fig, axes = plt.subplots(1, len(panels), figsize=(width, max(3.0, 1.6 + 0.38 * n_rows)), squeeze=False)
    finite = np.concatenate([d[np.isfinite(d)] for _, _, d in panels])
    # colour scale from a little below the lowest value to 100, so that close values still differ
    vmin = max(0.0, min(90.0, 5 * math.floor(finite.min() / 5) - 5)) if finite.size else 50.0
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")
    for ax, (metric, labels, data) in zip(axes[0], panels):
        image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=vmin, vmax=100.0, aspect="auto")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(n_rows), table.rows, fontsize=8)
        for label in ax.get_yticklabels():
            if label.get_text() in table.mean_rows:
                label.set_fontweight("bold")
        ax.axhline(len(table.categories) - 0.5, color="black", linewidth=1.5)
        for r in range(n_rows):
            for c in range(data.shape[1]):
                value = data[r, c]
                text = "n/a" if np.isnan(value) else f"{value:.{decimals}f}"
                red, green, blue, _ = cmap(image.norm(value)) if np.isfinite(value) else (1, 1, 1, 1)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.45
                ax.text(
                    c,
                    r,
                    text,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if dark else "black",
                    fontweight="bold" if table.rows[r] in table.mean_rows else "normal",
                )
        ax.set_title(f"{dataset}: {SHORT_NAMES.get(metric, metric)} (%)", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# the whole report


@dataclass
class Report:
    """What :func:`make_report` built and wrote."""

    collection: Collection
    tables: list[DatasetTable]
    out_dir: Path
    files: list[Path] = field(default_factory=list)


def make_report(
    root: Path | str,
    out_dir: Path | str | None = None,
    metrics: Sequence[str] | None = None,
    collection: Collection | None = None,
    decimals: int = 1,
    plots: bool = True,
) -> Report:
    """Collect ``root`` and write, into ``out_dir`` (default ``<root>/report``): per dataset
    ``<dataset>.csv``, ``<dataset>.md`` and ``<dataset>.png``; ``report.md`` (everything),
    ``runs.csv`` (every run, raw fractions) and ``problems.csv`` (jobs without results).
    Raises :class:`KdadError` when ``root`` holds no results at all."""
    collection = collection if collection is not None else collect(root)
    if not collection.runs:
        counts = (
            f" ({len(collection.problems)} job(s) without results, "
            f"e.g. {_rel(collection.problems[0].folder, collection.root)}: {collection.problems[0].reason})"
            if collection.problems
            else ""
        )
        raise KdadError(f"no results.json below {collection.root}{counts}: pass the folder of a finished run or sweep")
    out = Path(out_dir) if out_dir is not None else collection.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(collection, resolve_metrics(collection, metrics))
    report = Report(collection, tables, out)

    def write(name: str, text: str) -> None:
        (out / name).write_text(text)
        report.files.append(out / name)

    sections = []
    for table in tables:
        picture = plot_heatmaps(collection, table.dataset, out / f"{table.dataset}.png", decimals) if plots else None
        if picture is not None:
            report.files.append(picture)
        write(f"{table.dataset}.csv", table_csv(table))
        markdown = table_markdown(table, decimals, image=picture.name if picture else None)
        write(f"{table.dataset}.md", markdown)
        sections.append(markdown)
    write("runs.csv", runs_csv(collection))
    write("problems.csv", problems_csv(collection))
    counts = (
        f"{len(collection.runs)} run(s) found, {len(collection.used)} used; "
        f"{len(collection.problems)} job(s) without results."
    )
    header = [f"# kdad report: {collection.root}", "", counts, "", ""]
    write("report.md", "\n".join(header) + "\n".join(sections) + _problems_markdown(collection))
    return report


def _problems_markdown(collection: Collection) -> str:
    if not collection.problems:
        return ""
    lines = ["", "## Jobs without results", "", "| status | job | folder | reason |", "|---|---|---|---|"]
    lines.extend(
        "| "
        + " | ".join(_md_escape(x) for x in (p.status, _describe(p), _rel(p.folder, collection.root), p.reason))
        + " |"
        for p in collection.problems
    )
    return "\n".join(lines) + "\n"


def print_report(report: Report, decimals: int = 1, console: Any = None) -> None:
    """The tables, superseded runs and jobs without results, as rich tables on the console."""
    from rich.console import Console

    if console is None:
        console = Console()
        console.width = max(console.width, 120)  # rich assumes 80 columns when not on a terminal
    for table in report.tables:
        console.print(rich_table(table, decimals))
        for note in table.notes:
            console.print(f"  - {note}", highlight=False, soft_wrap=True)
    print_problems(report.collection, console)
    console.print(
        f"report: {report.out_dir} ({', '.join(p.name for p in report.files)})", highlight=False, soft_wrap=True
    )


def rich_table(table: DatasetTable, decimals: int = 1) -> Any:
    """One dataset table as a :class:`rich.table.Table`."""
    from rich.table import Table

    result = Table(title=f"{table.dataset} (values in %)")
    result.add_column("category", no_wrap=True)
    for column in table.columns:
        style = "dim" if column.kind == "paper" else None
        result.add_column("\n".join(column.header_lines()), justify="right", no_wrap=True, style=style)
    for row in table.rows:
        if table.mean_rows and row == table.mean_rows[0]:
            result.add_section()
        cells = [format_value(v, c, decimals) for v, c in zip(table.cells[row], table.columns)]
        result.add_row(row, *cells, style="bold" if row in table.mean_rows else None)
    return result


def print_problems(collection: Collection, console: Any) -> None:
    """The jobs without results (nothing when there are none)."""
    if not collection.problems:
        return
    from rich.table import Table

    table = Table(title=f"{len(collection.problems)} job(s) without results")
    for name in ("status", "job", "folder", "reason"):
        table.add_column(name, overflow="fold")
    for p in collection.problems:
        table.add_row(p.status, _describe(p), _rel(p.folder, collection.root), p.reason)
    console.print(table)
