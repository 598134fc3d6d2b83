"""Speed of the exact pixel metric suite on the reference workload of specs/metrics.md.

1,700 float32 anomaly maps of 256x256 (~1.1e8 pixels), smooth random fields with blob- and
scratch-shaped defect masks on half of the images (seeded). Times the pixel part of
``kdad.metrics.evaluate`` and its components; ``--sklearn`` also times scikit-learn's
``roc_auc_score`` on the same pixels (slow, ~1 min), ``--device cuda`` runs on a GPU.

    .venv/bin/python experiments/metrics_speed/bench.py [--n 1700] [--size 256] [--sklearn]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdad.metrics import aupro, evaluate, pixel_auroc, rd_legacy_pro
from kdad.metrics.functional import _ap, _aupro, _auroc, _f1_max, _pixel_groups, pixel_data


def make_data(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [n,size,size] float32 and masks [n,size,size] uint8 (0/1), seeded."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, size // 16, size // 16, generator=g)
    maps = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    maps += 0.05 * torch.rand(n, size, size, generator=g)  # fine noise: ~all scores distinct
    masks = np.zeros((n, size, size), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for i in range(0, n, 2):  # every other image is defective: 1-3 elliptic blobs
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0.1, 0.9, 2) * size
            ry, rx = rng.uniform(0.02, 0.12, 2) * size
            y0, y1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, size))
            x0, x1 = int(max(cx - rx, 0)), int(min(cx + rx + 1, size))
            yy, xx = np.mgrid[y0:y1, x0:x1]
            masks[i, y0:y1, x0:x1] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if rng.random() < 0.3:  # and sometimes a 1-px diagonal scratch
            k = np.arange(int(size * 0.6))
            masks[i, k + size // 8, k + size // 5] = 1
    masks_t = torch.from_numpy(masks)
    maps += 0.6 * masks_t * torch.rand(n, 1, 1, generator=g)  # defects score higher, variably
    return maps.contiguous(), masks_t


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status (Linux), in KiB; 0 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    """Reset the process' peak RSS (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def timed(fn: Callable[[], Any], repeat: int = 2) -> tuple[float, float, Any]:
    """(first call, best of ``repeat`` calls, result) in seconds."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0], min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1700)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--sklearn", action="store_true", help="also time sklearn roc_auc_score")
    ap.add_argument("--legacy", action="store_true", help="also time the RD legacy PRO")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    maps, masks = make_data(args.n, args.size)
    maps, masks = maps.to(args.device), masks.to(args.device)
    scores = maps.amax(dim=(1, 2))
    labels = masks.amax(dim=(1, 2))
    n_pix = maps.numel()
    print(
        f"{args.n} maps {args.size}x{args.size} = {n_pix:.3g} px, defect px "
        f"{masks.float().mean().item():.2%}, torch threads {torch.get_num_threads()}, "
        f"device {args.device}, {platform.processor() or platform.machine()}"
    )

    rows: list[tuple[str, float, float]] = []
    # the realistic call first, in a process that holds only the data: its memory high-water mark
    reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    t0, t, suite = timed(lambda: evaluate(scores, labels, maps, masks, legacy_pro=False))
    rss1 = _status_kib("VmHWM")
    rows.append(("evaluate(legacy_pro=False): whole suite", t0, t))
    flat = maps.reshape(-1).cpu().numpy().copy()
    t0, t, _ = timed(lambda: np.sort(flat))
    rows.append(("np.sort of the pooled float32 scores (reference)", t0, t))
    t0, t, data = timed(lambda: pixel_data(maps, masks))
    rows.append(("pixel_data: pool + 8-conn labelling (scipy)", t0, t))
    t0, t, groups = timed(lambda: _pixel_groups(data, True))
    rows.append(("one sort + positive tie groups", t0, t))
    t0, t, _vals = timed(
        lambda: (_auroc(groups, "a"), _ap(groups, "b"), _f1_max(groups, "c"), _aupro(groups, data.n_regions, 0.3))
    )
    rows.append(("AUROC + AP + F1max + AU-PRO from the groups", t0, t))
    t0, t, _a = timed(lambda: aupro(maps, masks))
    rows.append(("aupro() alone", t0, t))
    t0, t, _ = timed(lambda: pixel_auroc(maps, masks))
    rows.append(("pixel_auroc() alone", t0, t))
    if args.legacy:
        t0, t, _legacy = timed(lambda: rd_legacy_pro(maps, masks))
        rows.append(("rd_legacy_pro() alone", t0, t))
        t0, t, _ = timed(lambda: evaluate(scores, labels, maps, masks, legacy_pro=True))
        rows.append(("evaluate(legacy_pro=True): suite + legacy PRO", t0, t))
    if args.sklearn:
        from sklearn.metrics import roc_auc_score

        y = masks.reshape(-1).cpu().numpy() != 0
        t0, t, sk = timed(lambda: roc_auc_score(y, flat), repeat=1)
        rows.append(("sklearn roc_auc_score (pixel AUROC only)", t0, t))
        print(f"sklearn pixel AUROC {sk:.8f} vs ours {suite['pixel_auroc']:.8f}")

    print("\n| step | first call (s) | best of 2 (s) |\n|---|---|---|")
    for name, first, best in rows:
        print(f"| {name} | {first:.2f} | {best:.2f} |")
    values = ", ".join(f"{k}={v:.4f}" for k, v in suite.items())
    print(f"\n{data.n_regions} defect regions; {values}")
    print(
        f"memory: RSS {rss0 / 2**20:.2f} GiB before evaluate() (maps + masks = "
        f"{n_pix * 5 / 2**30:.2f} GiB of it), peak {rss1 / 2**20:.2f} GiB during it "
        f"(+{(rss1 - rss0) / 2**20:.2f} GiB)"
    )


if __name__ == "__main__":
    main()
