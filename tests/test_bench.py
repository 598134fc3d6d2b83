"""Smoke tests of the kdad-vs-anomalib benchmark (experiments/bench): kdad's half runs in
--quick mode and writes sane JSON; compare.py computes kdad/anomalib ratios right.
No anomalib, no downloads."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "bench"


def _compare_module():
    spec = importlib.util.spec_from_file_location("bench_compare", BENCH / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.numerics
def test_bench_kdad_quick_writes_positive_numbers(tmp_path: Path) -> None:
    out = tmp_path / "kdad.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_kdad.py"),
            "--quick",
            "--bf16",
            "none",
            "--threads",
            "1",
            "--data-dir",
            str(tmp_path / "data"),
            "--json",
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["impl"] == "kdad"
    assert result["machine"]["threads"] == 1 and result["machine"]["cores"] >= 1
    assert result["peak"]["peak_fp32_flops"] > 0 and result["peak"]["peak_bf16_flops"] > 0
    r = result["backbones"]["resnet18"]
    assert r["params"]["trainable"] > 0 and r["params"]["frozen"] > 0
    assert r["train_flops_per_image"] > r["forward_flops_per_image"] > 0
    assert "train_bf16" not in r
    for key in ("train_fp32", "infer_b1", "infer_b2"):
        assert r[key]["images_per_s"] > 0, key
        assert r[key]["peak_rss_mib"] > 0, key
        assert r[key]["achieved_fraction_of_peak"] > 0, key
    ev = r["eval"]
    assert ev["images"] == 5 and ev["seconds"] >= ev["forward_seconds"] > 0
    assert 0.0 <= ev["metrics"]["image_auroc"] <= 1.0 and "aupro" in ev["metrics"]
    # the levers: cached training, channels-last inference (chunked too), and the same metrics
    assert r["train_fp32_cached"]["images_per_s"] > 0 and r["train_fp32_cached"]["cache_gib"] > 0
    for key in ("infer_cl_b1", "infer_cl_b2", "infer_cl_b2_chunked"):
        assert r[key]["images_per_s"] > 0, key
    assert all(v["images_per_s"] > 0 for v in result["loader"].values()) and len(result["loader"]) == 4
    # channels-last moves AUROC at most through the pairs its measured score / map change can
    # reorder (kdad.metrics.auroc_change_bound); float32 rounding keeps that share small
    deltas, tolerances = r["eval_levers"]["metric_deltas"], r["eval_levers"]["auroc_tolerances"]
    assert 0 <= tolerances["max_abs_map_difference"] < 1e-3 and 0 <= tolerances["max_abs_score_difference"] < 1e-3
    for key in ("image_auroc", "pixel_auroc"):
        assert abs(deltas[key]) <= tolerances[key], (key, deltas[key], tolerances[key])
    assert tolerances["pixel_auroc"] < 0.05  # thousands of pixels: few pairs within rounding

    # compare.py on kdad's JSON alone prints the table
    proc = subprocess.run(
        [sys.executable, str(BENCH / "compare.py"), str(out)], check=False, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "train fp32 img/s" in proc.stdout and "kdad only" in proc.stdout
    assert "teacher cached" in proc.stdout and "channels-last" in proc.stdout


def _result(impl: str, train: float, infer32: float, eval_s: float, trainable: int) -> dict:
    return {
        "impl": impl,
        "version": "0",
        "args": {"image_size": 256, "train_batch": 16, "warmup": 1, "steps": 3, "infer_reps": 3},
        "machine": {
            "cpu": "test cpu",
            "cores": 2,
            "torch": "2",
            "threads": 2,
            "device": "cpu",
            "load_average_start": [0.1],
            "load_average_end": [0.2],
        },
        "peak": {"matmul_size": 64, "peak_fp32_flops": 1e11, "peak_bf16_flops": 1e10},
        "backbones": {
            "wide_resnet50_2": {
                "params": {"trainable": trainable, "frozen": 68_000_000, "bottleneck": 1, "decoder": 2},
                "forward_flops_per_image": 4e10,
                "train_flops_per_image": 1e11,
                "train_fp32": {"images_per_s": train, "peak_rss_mib": 1000.0},
                "infer_b32": {"images_per_s": infer32, "peak_rss_mib": 2000.0},
                "eval": {"seconds": eval_s, "forward_seconds": eval_s / 2, "metrics_and_overhead_seconds": eval_s / 2},
            }
        },
    }


def test_compare_ratios_are_kdad_over_anomalib(tmp_path: Path) -> None:
    compare = _compare_module()
    kdad = _result("kdad", train=2.0, infer32=6.0, eval_s=10.0, trainable=83_800_000)
    anomalib = _result("anomalib", train=1.0, infer32=4.0, eval_s=20.0, trainable=64_000_000)
    ratios = compare.ratios(kdad, anomalib)["wide_resnet50_2"]
    assert ratios["train fp32 img/s"] == pytest.approx(2.0)
    assert ratios["infer batch 32 img/s"] == pytest.approx(1.5)
    assert ratios["whole test set eval (s)"] == pytest.approx(0.5)
    assert ratios["trainable params (M)"] == pytest.approx(83.8 / 64.0)
    assert ratios["frozen encoder params (M)"] == pytest.approx(1.0)
    assert "train bf16-autocast img/s" not in ratios  # measured by neither side

    (tmp_path / "k.json").write_text(json.dumps(kdad))
    (tmp_path / "a.json").write_text(json.dumps(anomalib))
    merged = tmp_path / "out" / "merged.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            str(tmp_path / "k.json"),
            str(tmp_path / "a.json"),
            "--out",
            str(merged),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| train fp32 img/s | 2 | 1 | 2.00 |" in proc.stdout
    assert "anomalib trainable 64,000,000" in proc.stdout
    assert "No GPU was available" in proc.stdout
    data = json.loads(merged.read_text())
    assert data["ratios_kdad_over_anomalib"]["wide_resnet50_2"]["infer batch 32 img/s"] == pytest.approx(1.5)
