#!/usr/bin/env bash
# `make bench`: kdad's RD and anomalib's RD measured side by side on this machine.
#
#   experiments/bench/run.sh [bench options...]      e.g. --backbones resnet18 --steps 3
#
# Creates experiments/bench/.venv-anomalib (anomalib 2.7.0 + the torch/torchvision pip
# resolves for it; never a kdad dependency) on first use, runs bench_kdad.py with the kdad
# virtualenv and bench_anomalib.py with that one (same options, same threads, same inputs),
# then compare.py prints the kdad/anomalib table and writes results/<host>-<date>.json.
# BENCH_SKIP_ANOMALIB=1 measures kdad only.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=experiments/bench
KDAD_PY=${KDAD_PY:-.venv/bin/python}
ANOMALIB_VENV=${ANOMALIB_VENV:-$HERE/.venv-anomalib}
ANOMALIB_PY=$ANOMALIB_VENV/bin/python
PYTHON=${PYTHON:-python3}
OUT_DIR=$HERE/results
mkdir -p "$OUT_DIR"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$KDAD_PY" $HERE/bench_kdad.py --data-dir "$TMP/data" --json "$TMP/kdad.json" "$@"

ANOMALIB_JSON=()
if [ "${BENCH_SKIP_ANOMALIB:-0}" != 1 ]; then
    if [ ! -e "$ANOMALIB_VENV/.installed" ]; then
        echo "== installing anomalib 2.7.0 into $ANOMALIB_VENV (first run only)"
        test -x "$ANOMALIB_PY" || "$PYTHON" -m venv "$ANOMALIB_VENV"
        "$ANOMALIB_PY" -m pip install --quiet --upgrade pip
        # pip resolves torch and torchvision together (a torchvision only imports with its own torch)
        "$ANOMALIB_PY" -m pip install --quiet "anomalib==2.7.0" torch torchvision
        touch "$ANOMALIB_VENV/.installed"
    fi
    if "$ANOMALIB_PY" $HERE/bench_anomalib.py --data-dir "$TMP/data" --json "$TMP/anomalib.json" "$@"; then
        ANOMALIB_JSON=("$TMP/anomalib.json")
    else
        echo "!! the anomalib half failed (see above); reporting kdad alone" >&2
    fi
fi

"$KDAD_PY" $HERE/compare.py "$TMP/kdad.json" "${ANOMALIB_JSON[@]}" \
    --out "$OUT_DIR/$(hostname)-$(date +%Y%m%d-%H%M%S).json"
