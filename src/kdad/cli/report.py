"""``kdad-report``: one report over every ``results.json`` below a folder.

    kdad-report outputs/train/multiruns/<id>                 # writes <id>/report/
    kdad-report outputs/ --out reports/all --metrics all     # every study, every metric

Writes per dataset ``<dataset>.csv`` (exact values, percent), ``<dataset>.md`` and
``<dataset>.png`` (heatmaps of image and pixel AUROC), plus ``report.md``, ``runs.csv`` (every run,
raw fractions) and ``problems.csv`` (failed or missing jobs), and prints the tables.
Exit status: 0 on success, 2 with a one-line message when the folder has no results.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from kdad.errors import KdadError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdad-report",
        description="Collect every results.json below FOLDER into one table per dataset "
        "(categories x method/backbone/metric, means, published numbers side by side).",
    )
    parser.add_argument("folder", type=Path, help="a run or sweep folder, or any folder above several")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: FOLDER/report)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="METRIC",
        help="metrics in the tables, e.g. image_auroc pixel_auroc pixel_ap; 'all' for every metric "
        "(default: image_auroc pixel_auroc aupro rd_legacy_pro)",
    )
    parser.add_argument(
        "--decimals", type=int, default=1, help="decimals shown in Markdown, console and PNG (CSV is exact)"
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG heatmaps")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kdad-report`` console script."""
    args = build_parser().parse_args(argv)
    from kdad.report import make_report, print_report

    try:
        report = make_report(
            args.folder, out_dir=args.out, metrics=args.metrics, decimals=args.decimals, plots=not args.no_plots
        )
    except KdadError as error:
        print(f"kdad-report: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print_report(report, decimals=args.decimals)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
