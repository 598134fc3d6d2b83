"""kdad-report on a hand-written tree of results.json files (no training): exact cells, means,
paper comparison, duplicates, missing/failed jobs, Markdown, PNG, CLI, the sweep-end callback."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdad.cli.report import main as report_main
from kdad.errors import KdadError
from kdad.paper_results import RD_MVTEC
from kdad.report import build_tables, collect, make_report

# toy dataset: 2 methods x 2 categories (fractions, as results.json stores them)
TOY = {
    ("rd", "alpha"): {"image_auroc": 0.8125, "pixel_auroc": 0.9, "aupro": 0.7},
    ("rd", "beta"): {"image_auroc": 0.5, "pixel_auroc": 0.75, "aupro": 0.6},
    ("urd", "alpha"): {"image_auroc": 1.0, "pixel_auroc": 0.95, "aupro": 0.8},
    ("urd", "beta"): {"image_auroc": 0.625, "pixel_auroc": 0.85, "aupro": 0.5},
}
OLD_RD_ALPHA = {"image_auroc": 0.25, "pixel_auroc": 0.25, "aupro": 0.25}  # an older run, superseded
# MVTec AD, RD with the paper's backbone: two textures and one object
MVTEC = {
    "carpet": {"image_auroc": 0.99, "pixel_auroc": 0.98, "aupro": 0.9, "rd_legacy_pro": 0.96},
    "grid": {"image_auroc": 1.0, "pixel_auroc": 0.99, "aupro": 0.91, "rd_legacy_pro": 0.97},
    "bottle": {"image_auroc": 0.995, "pixel_auroc": 0.985, "aupro": 0.92, "rd_legacy_pro": 0.95},
}


def write_results(
    folder: Path,
    method: str,
    backbone: str,
    dataset: str,
    category: str,
    metrics: dict[str, float],
    mtime: float | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    payload = {
        "metrics": metrics,
        "method": method,
        "backbone": backbone,
        "dataset": dataset,
        "category": category,
        "seed": 111,
    }
    path.write_text(json.dumps(payload))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def write_hydra_job(folder: Path, dataset: str, category: str, overrides: list[str], test: bool = True) -> None:
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    config = {"test": test, "data": {"format": dataset, "category": category}, "backbone": {"name": "resnet18"}}
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    hydra = {"hydra": {"runtime": {"choices": {"method": "urd", "backbone": "resnet18", "data": dataset}}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    now = 1_700_000_000
    for (method, category), metrics in TOY.items():
        write_results(root / f"toy_{method}" / category, method, "resnet18", "toy", category, metrics, mtime=now)
    write_results(root / "old" / "alpha", "rd", "resnet18", "toy", "alpha", OLD_RD_ALPHA, mtime=now - 3600)
    for category, metrics in MVTEC.items():
        write_results(root / "mvtec_rd" / category, "rd", "wide_resnet50_2", "mvtec", category, metrics)
    # a sweep of urd over alpha, beta, gamma: alpha has results, beta's job died, gamma never started
    sweep = root / "sweep"
    (sweep).mkdir(parents=True)
    multirun = {
        "hydra": {"sweeper": {"params": None}, "overrides": {"task": ["method=urd", "data.category=alpha,beta,gamma"]}}
    }
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    write_hydra_job(sweep / "0_alpha", "toy", "alpha", ["method=urd", "data.category=alpha"])
    write_results(sweep / "0_alpha", "urd", "resnet18", "toy", "alpha", TOY[("urd", "alpha")], mtime=now - 60)
    write_hydra_job(sweep / "1_beta", "toy", "beta", ["method=urd", "data.category=beta"])
    (sweep / "1_beta" / "train.log").write_text("killed\n")
    # a job that wrote failed.json (issue 10)
    failed = root / "failed_job"
    failed.mkdir()
    (failed / "failed.json").write_text(
        json.dumps(
            {
                "error": {"type": "RuntimeError", "message": "CUDA out of memory"},
                "method": "rd",
                "backbone": "resnet18",
                "dataset": "toy",
                "category": "beta",
            }
        )
    )
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as handle:
        return {row["category"]: row for row in csv.DictReader(handle)}


def test_csv_cells_are_the_inputs_in_percent(tree: Path, tmp_path: Path) -> None:
    make_report(tree, tmp_path / "out", plots=False)
    table = read_csv(tmp_path / "out" / "toy.csv")
    assert set(table) == {"alpha", "beta", "mean"}  # no group means for an unknown dataset
    for (method, category), metrics in TOY.items():
        for metric, value in metrics.items():
            assert float(table[category][f"{method}/resnet18/{metric} [%]"]) == 100 * value
    # default metrics: rd_legacy_pro absent from every toy run, so no column for it
    assert not any("rd_legacy_pro" in header for header in table["alpha"])


def test_means_by_hand(tree: Path, tmp_path: Path) -> None:
    make_report(tree, tmp_path / "out", plots=False)
    toy = read_csv(tmp_path / "out" / "toy.csv")
    assert float(toy["mean"]["rd/resnet18/image_auroc [%]"]) == pytest.approx((81.25 + 50.0) / 2, abs=1e-12)
    assert float(toy["mean"]["urd/resnet18/pixel_auroc [%]"]) == pytest.approx((95.0 + 85.0) / 2, abs=1e-12)
    mvtec = read_csv(tmp_path / "out" / "mvtec.csv")
    assert list(mvtec) == ["carpet", "grid", "bottle", "textures mean", "objects mean", "mean"]  # config order
    column = "rd/wide_resnet50_2/image_auroc [%]"
    assert float(mvtec["textures mean"][column]) == pytest.approx((99.0 + 100.0) / 2, abs=1e-12)
    assert float(mvtec["objects mean"][column]) == pytest.approx(99.5, abs=1e-12)
    assert float(mvtec["mean"][column]) == pytest.approx((99.0 + 100.0 + 99.5) / 3, abs=1e-12)
    assert float(mvtec["mean"]["rd/wide_resnet50_2/aupro [%]"]) == pytest.approx((90 + 91 + 92) / 3, abs=1e-12)


def test_paper_columns_and_differences(tree: Path, tmp_path: Path) -> None:
    make_report(tree, tmp_path / "out", plots=False)
    mvtec = read_csv(tmp_path / "out" / "mvtec.csv")
    base = "rd/wide_resnet50_2"
    # per category: the paper's percent, and ours - paper in percentage points
    assert float(mvtec["carpet"][f"{base}/image_auroc paper [%]"]) == 98.9
    assert float(mvtec["carpet"][f"{base}/image_auroc ours-paper [pp]"]) == pytest.approx(99.0 - 98.9, abs=1e-9)
    assert float(mvtec["bottle"][f"{base}/image_auroc ours-paper [pp]"]) == pytest.approx(99.5 - 100.0, abs=1e-9)
    assert float(mvtec["grid"][f"{base}/pixel_auroc paper [%]"]) == 99.3
    assert float(mvtec["grid"][f"{base}/pixel_auroc ours-paper [pp]"]) == pytest.approx(99.0 - 99.3, abs=1e-9)
    # the paper's PRO is the per-image PRO: compared with rd_legacy_pro, never with aupro
    assert float(mvtec["bottle"][f"{base}/rd_legacy_pro paper [%]"]) == 96.6
    assert float(mvtec["bottle"][f"{base}/rd_legacy_pro ours-paper [pp]"]) == pytest.approx(95.0 - 96.6, abs=1e-9)
    assert f"{base}/aupro paper [%]" not in mvtec["bottle"]
    # mean rows: the paper's values averaged over the same categories
    assert float(mvtec["mean"][f"{base}/image_auroc paper [%]"]) == pytest.approx((98.9 + 100 + 100) / 3, abs=1e-9)
    assert float(mvtec["mean"][f"{base}/image_auroc ours-paper [pp]"]) == pytest.approx(
        (99.0 + 100 + 99.5) / 3 - (98.9 + 100 + 100) / 3, abs=1e-9
    )
    assert float(mvtec["textures mean"][f"{base}/rd_legacy_pro paper [%]"]) == pytest.approx(
        (97.0 + 97.6) / 2, abs=1e-9
    )
    assert float(mvtec["textures mean"][f"{base}/rd_legacy_pro ours-paper [pp]"]) == pytest.approx(
        (96 + 97) / 2 - (97.0 + 97.6) / 2, abs=1e-9
    )
    assert float(mvtec["objects mean"][f"{base}/pixel_auroc ours-paper [pp]"]) == pytest.approx(98.5 - 98.7, abs=1e-9)
    # no paper columns for a backbone the paper did not use
    toy = read_csv(tmp_path / "out" / "toy.csv")
    assert not any("paper" in header for header in toy["alpha"])
    text = (tmp_path / "out" / "mvtec.md").read_text()
    assert "rd_legacy_pro (not aupro" in text and "Deng & Li" in text


def test_paper_table_means_match_the_published_means() -> None:
    """The transcribed per-category values reproduce the published (rounded) means."""
    textures = ("carpet", "grid", "leather", "tile", "wood")
    for metric in RD_MVTEC.metric_names:
        values = {c: RD_MVTEC.value(c, metric) for c in RD_MVTEC.values}
        assert round(sum(values.values()) / 15, 1) == RD_MVTEC.published_means["mean"][metric]
        assert round(sum(values[c] for c in textures) / 5, 1) == RD_MVTEC.published_means["textures mean"][metric]
        objects = [v for c, v in values.items() if c not in textures]
        assert round(sum(objects) / 10, 1) == RD_MVTEC.published_means["objects mean"][metric]


def test_newest_of_several_runs_is_used_and_the_others_are_listed(tree: Path, tmp_path: Path) -> None:
    collection = collect(tree)
    used = collection.used[("rd", "resnet18", "toy", "alpha")]
    assert used.metrics == TOY[("rd", "alpha")]
    assert {r.folder for r in collection.superseded} == {tree / "old" / "alpha", tree / "sweep" / "0_alpha"}
    report = make_report(tree, tmp_path / "out", collection=collection, plots=False)
    runs = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert len(runs) == len(TOY) + 1 + len(MVTEC) + 1
    assert sum(r["used"] == "yes" for r in runs) == len(TOY) + len(MVTEC)
    old = next(r for r in runs if r["folder"].endswith(os.path.join("old", "alpha")))
    assert old["used"].startswith("no") and float(old["image_auroc"]) == 0.25
    toy_notes = next(t for t in report.tables if t.dataset == "toy").notes
    assert any("several runs; using the newest" in n and "old/alpha" in n for n in toy_notes)


def test_missing_failed_and_not_started_jobs_are_listed(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert report_main([str(tree), "--out", str(tmp_path / "out"), "--no-plots"]) == 0
    problems = list(csv.DictReader((tmp_path / "out" / "problems.csv").open()))
    by_status = {p["status"]: p for p in problems}
    assert len(problems) == 3 and set(by_status) == {"failed", "missing", "not started"}
    assert (
        by_status["failed"]["reason"]
        == "RuntimeError: CUDA out of memory; the table uses another run's result (toy_rd/beta)"
    )
    assert by_status["missing"]["reason"].endswith("the table uses another run's result (toy_urd/beta)")
    assert by_status["failed"]["folder"] == str(tree / "failed_job")
    assert by_status["missing"]["folder"] == str(tree / "sweep" / "1_beta")
    assert (by_status["missing"]["method"], by_status["missing"]["dataset"], by_status["missing"]["category"]) == (
        "urd",
        "toy",
        "beta",
    )
    assert "no results.json" in by_status["missing"]["reason"] and "train.log" in by_status["missing"]["reason"]
    assert (
        by_status["not started"]["category"] == "gamma" and "data.category=gamma" in by_status["not started"]["reason"]
    )
    out = capsys.readouterr().out
    assert "3 job(s) without results" in out and "CUDA out of memory" in out and "gamma" in out
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Jobs without results" in markdown and "1_beta" in markdown


def test_test_false_jobs_are_missing_with_that_reason(tmp_path: Path) -> None:
    write_hydra_job(tmp_path / "run", "toy", "alpha", [], test=False)
    (problem,) = collect(tmp_path).problems
    assert problem.status == "missing" and problem.reason.startswith("test=false")


def test_markdown_tables_are_well_formed(tree: Path, tmp_path: Path) -> None:
    report = make_report(tree, tmp_path / "out", plots=False)
    for table in report.tables:
        lines = [
            line for line in (tmp_path / "out" / f"{table.dataset}.md").read_text().splitlines() if line.startswith("|")
        ]
        assert len(lines) == 2 + len(table.rows)
        widths = {line.count("|") for line in lines}
        assert widths == {len(table.columns) + 2}, lines
        assert set(lines[1]) <= set("|-:")
        assert [line.split("|")[1].strip().strip("*") for line in lines[2:]] == table.rows
    mvtec = (tmp_path / "out" / "mvtec.md").read_text()
    assert "| carpet | 99.0 | 98.9 | +0.1 |" in mvtec  # display: one decimal, signed differences
    assert "| **mean** |" in mvtec


def test_png_is_written_and_not_blank(tree: Path, tmp_path: Path) -> None:
    import matplotlib.image

    make_report(tree, tmp_path / "out")
    for dataset in ("toy", "mvtec"):
        path = tmp_path / "out" / f"{dataset}.png"
        assert path.stat().st_size > 10_000
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert (
            len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97].round(2).tolist()}) > 20
        )  # colours, not blank


def test_metrics_option(tree: Path, tmp_path: Path) -> None:
    collection = collect(tree)
    (toy,) = [t for t in build_tables(collection, ["pixel_auroc"]) if t.dataset == "toy"]
    assert [c.metric for c in toy.columns] == ["pixel_auroc", "pixel_auroc"]
    with pytest.raises(KdadError, match="--metrics image_dice"):
        make_report(tree, tmp_path / "out", metrics=["image_dice"], collection=collection)
    make_report(tree, tmp_path / "out", metrics=["all"], collection=collection, plots=False)
    header = (tmp_path / "out" / "mvtec.csv").read_text().splitlines()[0]
    assert "rd/wide_resnet50_2/aupro [%]" in header and "rd/wide_resnet50_2/rd_legacy_pro paper [%]" in header


@pytest.mark.parametrize("case", ["empty", "absent", "only_failed"])
def test_cli_one_line_error_for_a_folder_without_results(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "nothing here"
    if case != "absent":
        folder.mkdir()
    if case == "only_failed":
        write_hydra_job(folder / "0_alpha", "toy", "alpha", [])
    proc = subprocess.run(
        [sys.executable, "-m", "kdad.cli.report", str(folder)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kdad-report: error:") and str(folder) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "only_failed":
        assert "1 job(s) without results" in lines[0]


def test_cli_writes_the_report_into_the_folder(tree: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kdad.cli.report", str(tree)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "toy.csv",
        "toy.md",
        "toy.png",
        "mvtec.csv",
        "mvtec.md",
        "mvtec.png",
        "runs.csv",
        "problems.csv",
        "report.md",
    ):
        assert (tree / "report" / name).is_file(), name
    assert "mean" in proc.stdout and "RD paper" in proc.stdout and "textures mean" in proc.stdout


def test_sweep_callback_prints_the_report_and_writes_summary_csv(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from omegaconf import OmegaConf

    from kdad.hydra_callbacks import SweepSummary

    sweep = tree / "sweep"
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    lines = (sweep / "summary.csv").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("method,backbone,dataset,category,image_auroc")
    assert (sweep / "report" / "toy.csv").is_file()
    out = capsys.readouterr().out
    assert "mean" in out and "not started" in out and f"summary: {sweep / 'summary.csv'}" in out
