"""Merge bench_kdad.py's and bench_anomalib.py's JSON into one table with kdad/anomalib ratios.

    python experiments/bench/compare.py KDAD.json [ANOMALIB.json] [--out results/<host>-<date>.json]

Ratios are kdad / anomalib of the same quantity: for images/s above 1 means kdad is faster;
for seconds, memory and FLOPs below 1 means kdad needs less. Without ANOMALIB.json the table
has kdad's column only.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

#: (row label, path inside a backbone's result, unit/format[, anomalib's path when the row is a
#: kdad lever compared against anomalib's plain row]); higher-is-better rows are img/s
ROWS: list[tuple[Any, ...]] = [
    ("trainable params (M)", ("params", "trainable"), "M"),
    ("frozen encoder params (M)", ("params", "frozen"), "M"),
    ("forward GFLOPs / image", ("forward_flops_per_image",), "G"),
    ("training-step GFLOPs / image", ("train_flops_per_image",), "G"),
    ("train fp32 img/s", ("train_fp32", "images_per_s"), "f"),
    (
        "train fp32 img/s, kdad teacher cached (epochs >= 2)",
        ("train_fp32_cached", "images_per_s"),
        "f",
        ("train_fp32", "images_per_s"),
    ),
    ("train bf16-autocast img/s", ("train_bf16", "images_per_s"), "f"),
    ("infer batch 1 img/s", ("infer_b1", "images_per_s"), "f"),
    ("infer batch 1 img/s, kdad channels-last", ("infer_cl_b1", "images_per_s"), "f", ("infer_b1", "images_per_s")),
    ("infer batch 1 img/s, kdad compiled", ("infer_compiled_b1", "images_per_s"), "f", ("infer_b1", "images_per_s")),
    ("infer batch 32 img/s", ("infer_b32", "images_per_s"), "f"),
    ("infer batch 32 img/s, kdad channels-last", ("infer_cl_b32", "images_per_s"), "f", ("infer_b32", "images_per_s")),
    (
        "infer batch 32 img/s, kdad channels-last in chunks",
        ("infer_cl_b32_chunked", "images_per_s"),
        "f",
        ("infer_b32", "images_per_s"),
    ),
    ("infer batch 32 img/s, kdad compiled", ("infer_compiled_b32", "images_per_s"), "f", ("infer_b32", "images_per_s")),
    ("whole test set eval (s)", ("eval", "seconds"), "f"),
    ("  of which forward (s)", ("eval", "forward_seconds"), "f"),
    ("  of which metrics + overhead (s)", ("eval", "metrics_and_overhead_seconds"), "f"),
    ("whole test set eval (s), kdad channels-last", ("eval_levers", "seconds"), "f", ("eval", "seconds")),
    ("  image AUROC change from the levers", ("eval_levers", "metric_deltas", "image_auroc"), "e"),
    ("  pixel AUROC change from the levers", ("eval_levers", "metric_deltas", "pixel_auroc"), "e"),
    ("peak RSS train fp32 (MiB)", ("train_fp32", "peak_rss_mib"), "i"),
    ("peak RSS infer batch 32 (MiB)", ("infer_b32", "peak_rss_mib"), "i"),
    ("train fp32: fraction of fp32 matmul peak", ("train_fp32", "achieved_fraction_of_peak"), "%"),
    ("train bf16: fraction of bf16 matmul peak", ("train_bf16", "achieved_fraction_of_peak"), "%"),
    ("infer batch 32: fraction of fp32 peak", ("infer_b32", "achieved_fraction_of_peak"), "%"),
]


def anomalib_path(row: tuple[Any, ...]) -> tuple[str, ...]:
    """Where anomalib's value of a row lives (lever rows point at anomalib's plain row)."""
    return row[3] if len(row) > 3 else row[1]


def get(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value or value[key] is None:
            return None
        value = value[key]
    return float(value)


def ratios(kdad: dict[str, Any], anomalib: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{backbone: {row label: kdad value / anomalib value}} for rows both sides measured."""
    out: dict[str, dict[str, float]] = {}
    for backbone, k in kdad.get("backbones", {}).items():
        a = anomalib.get("backbones", {}).get(backbone)
        if a is None:
            continue
        out[backbone] = {}
        for row in ROWS:
            label, path = row[0], row[1]
            kv, av = get(k, path), get(a, anomalib_path(row))
            if kv is not None and av not in (None, 0.0):
                out[backbone][label] = kv / av
    return out


def fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "M":
        return f"{value / 1e6:.2f}"
    if kind == "G":
        return f"{value / 1e9:.2f}"
    if kind == "i":
        return f"{value:.0f}"
    if kind == "e":
        return f"{value:+.2e}"
    if kind == "%":
        return f"{100 * value:.1f} %"
    return f"{value:.3g}" if value < 100 else f"{value:.1f}"


def table(kdad: dict[str, Any], anomalib: dict[str, Any] | None) -> str:
    lines = []
    r = ratios(kdad, anomalib) if anomalib else {}
    for backbone, k in kdad["backbones"].items():
        a = (anomalib or {}).get("backbones", {}).get(backbone)
        size = kdad["args"]["image_size"]
        lines.append(f"\n### RD {backbone}, {size}x{size}\n")
        if a is not None:
            lines += ["| quantity | kdad | anomalib | kdad/anomalib |", "|---|---|---|---|"]
        else:
            lines += ["| quantity | kdad |", "|---|---|"]
        for row in ROWS:
            label, path, kind = row[0], row[1], row[2]
            kv = get(k, path)
            av = get(a, anomalib_path(row)) if a is not None else None
            if kv is None and (av is None or len(row) > 3):
                continue
            if a is not None:
                ratio = r.get(backbone, {}).get(label) if kind != "e" else None
                lines.append(
                    f"| {label} | {fmt(kv, kind)} | {fmt(av, kind)} | {'—' if ratio is None else f'{ratio:.2f}'} |"
                )
            else:
                lines.append(f"| {label} | {fmt(kv, kind)} |")
    return "\n".join(lines)


def header(result: dict[str, Any]) -> str:
    m, p, args = result["machine"], result["peak"], result["args"]
    flags = ",".join(m.get("cpu_flags", []))
    gpu = m.get("gpu", "none available")
    return (
        f"{result['impl']} {result['version']}: {m['cpu']} ({flags}), {m['cores']} cores, "
        f"{m.get('memory_gib', '?')} GiB, torch {m['torch']}, {m['threads']} threads, device "
        f"{m['device']} (GPU: {gpu}); matmul peak fp32 {p['peak_fp32_flops'] / 1e9:.1f} GFLOP/s "
        f"(n={p.get('matmul_n_fp32', p['matmul_size'])}), bf16 {p['peak_bf16_flops'] / 1e9:.1f} GFLOP/s "
        f"(n={p.get('matmul_n_bf16', p['matmul_size'])}); "
        f"load average {m['load_average_start'][0]:.2f} -> {m.get('load_average_end', [float('nan')])[0]:.2f}; "
        f"train batch {args['train_batch']}, warm-up {args['warmup']}, median of {args['steps']} steps, "
        f"inference: 1 warm-up call, median of max({args['infer_reps']}, ceil(8/batch)) calls"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kdad")
    ap.add_argument("anomalib", nargs="?")
    ap.add_argument("--out", default=None, help="merged JSON (results + ratios)")
    args = ap.parse_args()
    kdad = json.loads(Path(args.kdad).read_text())
    anomalib = json.loads(Path(args.anomalib).read_text()) if args.anomalib else None
    print(header(kdad))
    if anomalib:
        print(header(anomalib))
    print(table(kdad, anomalib))
    if anomalib:
        print("\nkdad/anomalib: img/s above 1 = kdad faster; seconds, MiB, FLOPs below 1 = kdad needs less.")
        for backbone, a in anomalib["backbones"].items():
            k = kdad["backbones"].get(backbone, {})
            print(
                f"Parameters ({backbone}): kdad trainable {get(k, ('params', 'trainable')) or 0:,.0f}, "
                f"anomalib trainable {a['params']['trainable']:,.0f} (bottleneck {a['params']['bottleneck']:,.0f} "
                f"+ decoder {a['params']['decoder']:,.0f})."
            )
        print(
            "anomalib's RD decoder differs from the official RD4AD architecture (fewer trainable "
            "parameters for WRN50-2 than the official 83.8 M), so the comparison is per image, "
            "not per parameter."
        )
    else:
        print("\n(no anomalib result: kdad only)")
    for backbone, k in kdad["backbones"].items():
        if "train_bf16_skipped" in k:
            print(f"bf16-autocast training ({backbone}): not measured: {k['train_bf16_skipped']}.")
        elif "train_bf16" in k and k["train_bf16"].get("batch") != kdad["args"]["train_batch"]:
            b = k["train_bf16"]
            print(
                f"bf16-autocast training ({backbone}): batch {b['batch']}, {b.get('warmup')} warm-up + "
                f"{b.get('steps')} timed step(s) (no native bf16 on this CPU)."
            )
    if kdad.get("loader"):
        print("\nkdad training data path (decoded-image cache -> batches; images/s it delivers):")
        for key, value in kdad["loader"].items():
            print(f"  {key}: {value['images_per_s']:.0f} img/s ({value['images']} images in {value['seconds']:.2f} s)")
    if kdad["machine"]["device"] == "cpu":
        print("No GPU was available: GPU numbers unmeasured.")
    if args.out:
        merged = {
            "kdad": kdad,
            "anomalib": anomalib,
            "ratios_kdad_over_anomalib": ratios(kdad, anomalib) if anomalib else None,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(merged, indent=1) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
