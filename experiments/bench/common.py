"""Shared pieces of bench_kdad.py and bench_anomalib.py (plain torch + stdlib only: the two
scripts run in different virtualenvs, kdad's and anomalib's, and must measure the same way).

Timing: wall clock (``time.perf_counter``) around whole steps, CUDA synchronised; the first
``warmup`` calls are discarded and the median of the timed calls is reported.
Memory: the process' resident-set high-water mark per phase (``VmHWM`` from
``/proc/self/status``, reset through ``/proc/self/clear_refs`` before each phase; Linux >= 4.0,
falling back to ``getrusage`` ru_maxrss, the whole-process peak) and, on CUDA,
``torch.cuda.max_memory_allocated`` per phase.
FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and convolutions, forward and,
for a training step, backward; elementwise ops, norms and the Gaussian blur are not counted).
Peak: the best of a few large square matmuls in fp32 and bf16, timed in the same process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--backbones", default="wide_resnet50_2,resnet18", help="comma-separated")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=16, help="the paper's batch 16")
    ap.add_argument("--infer-batches", default="1,32", help="inference batch sizes")
    ap.add_argument("--eval-batch", type=int, default=32, help="test-set batch (kdad's default)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed training steps / inference calls")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (median reported)")
    ap.add_argument(
        "--infer-reps",
        type=int,
        default=2,
        help="timed inference calls per batch size (at least 8 images' worth; 1 warm-up call)",
    )
    ap.add_argument(
        "--bf16",
        default="auto",
        choices=["auto", "all", "none"],
        help="bf16-autocast training row: all backbones at the training batch; none; or "
        "auto = all on CUDA and on CPUs with native bf16 (avx512_bf16/amx_bf16), "
        "else resnet18 only at batch 2, 1 warm-up + 1 timed step (emulated bf16 "
        "is ~10x slower than fp32: WRN50-2 would take an hour)",
    )
    ap.add_argument(
        "--test-images", type=int, default=40, help="whole test set size (16 good + 24 defective by default)"
    )
    ap.add_argument("--data-dir", default=None, help="demo test set (bench_kdad writes it; both read it)")
    ap.add_argument("--matmul-size", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (resnet18, 64 px, 1 step) for tests")
    ap.add_argument(
        "--infer-chunk",
        type=int,
        default=8,
        help="kdad lever row: the largest inference batch split into chunks of this size",
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="kdad lever rows: torch.compile (inductor, freezing) inference; minutes to compile",
    )
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.backbones, args.image_size, args.train_batch = "resnet18", 32, 2
        args.infer_batches, args.eval_batch, args.warmup, args.steps = "1,2", 4, 1, 1
        args.infer_reps, args.test_images, args.matmul_size, args.infer_chunk = 1, 5, 128, 1
    args.backbones = [b for b in args.backbones.split(",") if b]
    args.infer_batches = [int(b) for b in args.infer_batches.split(",") if b]
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    return args


# ---------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def native_bf16(device: str) -> bool:
    return device == "cuda" or any(f in cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def bf16_plan(args: argparse.Namespace, backbone: str) -> dict[str, Any] | None:
    """Batch, warm-up and timed steps of the bf16-autocast training row (None: not measured)."""
    if args.bf16 == "none":
        return None
    if args.bf16 == "all" or native_bf16(args.device):
        return {"batch": args.train_batch, "warmup": args.warmup, "steps": args.steps}
    if backbone != "resnet18":
        return None
    return {"batch": min(2, args.train_batch), "warmup": 1, "steps": 1}


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
        "load_average_start": list(os.getloadavg()),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(ValueError, OSError):
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return info


# ---------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_median(fn: Callable[[], Any], device: str, warmup: int, reps: int) -> tuple[float, list[float]]:
    """Median seconds of ``reps`` calls after ``warmup`` untimed ones, and all timed values."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# ---------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakMemory:
    """Resident-set (and CUDA) high-water mark of the code inside the ``with`` block."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.rss_mib = 0.0
        self.cuda_mib: float | None = None

    def __enter__(self) -> Self:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self._exact = True
        except OSError:
            self._exact = False
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: object) -> None:
        hwm = _status_kib("VmHWM") if self._exact else 0
        self.rss_mib = (hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
        if self.device == "cuda":
            sync(self.device)
            self.cuda_mib = torch.cuda.max_memory_allocated() / 2**20


# ---------------------------------------------------------------------------- FLOPs, peak
def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: str, size: int, reps: int = 3) -> dict[str, float]:
    """Best achieved FLOP/s of square matmuls (2*n^3 FLOPs each), fp32 and bf16.

    n doubles from 256 up to ``size`` while one call takes under 0.2 s, so a dtype without fast
    kernels (bf16 emulated on an AVX2 CPU: ~100x slower than fp32) still finishes in seconds;
    the n used per dtype is reported."""
    out: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        n = min(256, size)
        while True:
            a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
            b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
            torch.mm(a, b)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            first = time.perf_counter() - t0
            if n >= size or first >= 0.2:
                break
            n *= 2
        best = first
        for _ in range(reps - 1):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        out[f"peak_{name}_flops"] = 2 * n**3 / best
        out[f"matmul_n_{name}"] = n
    out["matmul_size"] = size
    return out


# ---------------------------------------------------------------------------- inputs
def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 [B,3,H,W] RGB, seeded: the same bytes in both scripts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)


def imagenet_normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 RGB -> ImageNet-normalised float32 (what both pipelines feed their networks)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def read_test_set(root: Path, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The demo test set in MVTec layout (one category folder under ``root``) as
    (uint8 images [N,3,H,W], int64 labels [N], float32 masks [N,1,H,W] in {0,1}).
    Reads with PIL only, so anomalib's virtualenv can use it too."""
    import numpy as np
    from PIL import Image

    cats = sorted(p for p in root.iterdir() if p.is_dir())
    if len(cats) != 1:
        raise SystemExit(f"{root}: expected one category folder, found {[c.name for c in cats]}")
    cat = cats[0]
    images, labels, masks = [], [], []
    for kind_dir in sorted((cat / "test").iterdir()):
        for path in sorted(kind_dir.glob("*.png")):
            img = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            if kind_dir.name == "good":
                labels.append(0)
                masks.append(torch.zeros(1, size, size))
            else:
                labels.append(1)
                m = Image.open(cat / "ground_truth" / kind_dir.name / f"{path.stem}_mask.png").convert("L")
                m = m.resize((size, size), Image.BILINEAR)
                masks.append((torch.from_numpy(np.asarray(m).copy()).float() / 255 > 0.5).float()[None])
    return torch.stack(images), torch.tensor(labels), torch.stack(masks)


def write_json(path: str | None, result: dict[str, Any]) -> None:
    text = json.dumps(result, indent=1)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    else:
        print(text)


def achieved(flops_per_image: float, images_per_s: float, peak: float) -> float:
    return flops_per_image * images_per_s / peak if peak else float("nan")


# ---------------------------------------------------------------------------- the shared measurement
def measure_speed(
    res: dict[str, Any],
    args: argparse.Namespace,
    backbone: str,
    module: torch.nn.Module,
    train_loss: Callable[[torch.Tensor], torch.Tensor],
    make_optimizer: Callable[[], torch.optim.Optimizer],
    infer: Callable[[torch.Tensor], Any],
) -> None:
    """FLOPs per image, training img/s (fp32, and bf16 autocast where planned) and inference
    img/s, the same way for both implementations. ``train_loss`` and ``infer`` take uint8 images
    (each side normalises as its own pipeline does); results go into ``res``."""
    dev, size = args.device, args.image_size

    # FLOPs per image: forward (eval, batch 1) and one training step (batch 2, / 2)
    module.eval()
    one = random_images(1, size).to(dev)
    with torch.inference_mode():
        res["forward_flops_per_image"] = count_flops(lambda: infer(one))
    module.train()
    two = random_images(2, size).to(dev)
    res["train_flops_per_image"] = count_flops(lambda: train_loss(two).backward()) / 2
    module.zero_grad(set_to_none=True)

    # training: loss + backward + Adam step + zero_grad, median of the timed steps after warm-up
    plans = {
        "fp32": {"batch": args.train_batch, "warmup": args.warmup, "steps": args.steps},
        "bf16": bf16_plan(args, backbone),
    }
    if plans["bf16"] is None:
        res["train_bf16_skipped"] = (
            "--bf16 none"
            if args.bf16 == "none"
            else "no native bf16 on this device (emulated bf16 is ~10x slower than fp32)"
        )
    for prec, plan in plans.items():
        if plan is None:
            continue
        module.train()
        optimizer = make_optimizer()
        images = random_images(plan["batch"], size, seed=1).to(dev)

        def step(prec: str = prec, optimizer: torch.optim.Optimizer = optimizer, images: torch.Tensor = images) -> None:
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = train_loss(images)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        with PeakMemory(dev) as mem:
            sec, times = timed_median(step, dev, plan["warmup"], plan["steps"])
        res[f"train_{prec}"] = {
            **plan,
            "s_per_step": sec,
            "step_times": times,
            "images_per_s": plan["batch"] / sec,
            "peak_rss_mib": mem.rss_mib,
            "cuda_peak_mib": mem.cuda_mib,
        }
        print(
            f"  train {prec} batch {plan['batch']}: {plan['batch'] / sec:.2f} img/s "
            f"({sec:.2f} s/step, steps {[round(t, 2) for t in times]})",
            flush=True,
        )

    # inference: the whole map + score path, under inference_mode
    module.eval()
    for b in args.infer_batches:
        x = random_images(b, size, seed=2).to(dev)
        with torch.inference_mode(), PeakMemory(dev) as mem:
            sec, times = timed_median(lambda x=x: infer(x), dev, 1, max(args.infer_reps, -(-8 // b)))
        res[f"infer_b{b}"] = {
            "batch": b,
            "s_per_call": sec,
            "call_times": times,
            "images_per_s": b / sec,
            "peak_rss_mib": mem.rss_mib,
            "cuda_peak_mib": mem.cuda_mib,
        }
        print(f"  infer batch {b}: {b / sec:.2f} img/s ({sec:.3f} s/call)", flush=True)


def measure_peak(args: argparse.Namespace) -> dict[str, Any]:
    """The fp32 and bf16 matmul peaks of this run (printed)."""
    peak = matmul_peak(args.device, args.matmul_size)
    print(
        f"matmul peak: fp32 {peak['peak_fp32_flops'] / 1e9:.1f} GFLOP/s (n={peak['matmul_n_fp32']}), "
        f"bf16 {peak['peak_bf16_flops'] / 1e9:.1f} GFLOP/s (n={peak['matmul_n_bf16']})",
        flush=True,
    )
    return peak


def add_achieved_fractions(r: dict[str, Any], peak: dict[str, Any], infer_batches: list[int]) -> None:
    """Annotate one backbone's training and inference rows with their fraction of the peak."""
    for prec in ("fp32", "bf16"):
        if f"train_{prec}" in r:
            r[f"train_{prec}"]["achieved_fraction_of_peak"] = achieved(
                r["train_flops_per_image"], r[f"train_{prec}"]["images_per_s"], peak[f"peak_{prec}_flops"]
            )
    for b in infer_batches:
        r[f"infer_b{b}"]["achieved_fraction_of_peak"] = achieved(
            r["forward_flops_per_image"], r[f"infer_b{b}"]["images_per_s"], peak["peak_fp32_flops"]
        )
