"""Speed of kdad's Reverse Distillation: training, inference, whole-test-set evaluation.

Per backbone (WRN50-2 and ResNet-18 by default, 256x256): training images/s of kdad's real
training path (``ReverseDistillation.training_step`` -> backward -> the method's Adam step),
in float32 and under ``torch.autocast(bfloat16)`` (what ``trainer.precision=bf16-mixed``
does); inference images/s of ``model(uint8 images)`` (normalisation, networks, anomaly map,
Gaussian, score) at batch 1 and 32 under ``torch.inference_mode``; the time of a Lightning
``trainer.test`` over a whole generated test set (kdad's demo generator, MVTec layout) including
kdad's exact metrics; peak memory; FLOPs per image; and the achieved fraction of the peak
matmul FLOP/s measured in the same process. Random init (``weights="none"``): no downloads.

    .venv/bin/python experiments/bench/bench_kdad.py [--backbones wide_resnet50_2,resnet18]
        [--steps 3] [--warmup 1] [--threads 2] [--quick] [--json OUT]

``make bench`` runs this, bench_anomalib.py and compare.py (see README.md here).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PeakMemory,
    add_achieved_fractions,
    machine,
    measure_peak,
    measure_speed,
    parse_args,
    write_json,
)

from kdad.data import AnomalyDataModule, generate_demo_dataset
from kdad.data.batch import Batch
from kdad.methods import ReverseDistillation


def make_test_set(root: Path, size: int, n: int) -> Path:
    good = max(1, round(0.4 * n))
    generate_demo_dataset(root, categories=["pill"], image_size=size, n_train=1,
                          n_test_good=good, n_test_defect=max(1, n - good))
    return root


def train_batch(images: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(image=images, label=torch.zeros(n, dtype=torch.long, device=images.device),
                 mask=torch.zeros(n, 1, *images.shape[-2:], device=images.device))


def bench_backbone(backbone: str, args: Any, data_root: Path) -> dict[str, Any]:
    dev = args.device
    size = args.image_size
    print(f"== kdad RD {backbone} {size}x{size} on {dev}, {args.threads} threads", flush=True)
    torch.manual_seed(0)
    model = ReverseDistillation(backbone=backbone, weights="none").to(dev)
    res: dict[str, Any] = {"params": model.parameter_counts()}

    # training: training_step (normalise, frozen encoder under no_grad, OCBE, decoder, loss)
    # + backward + the method's own optimiser (Adam lr 0.005, betas (0.5, 0.999));
    # inference: model(uint8) = normalise + encoder + OCBE + decoder + anomaly map + Gaussian + max
    measure_speed(
        res, args, backbone, model,
        train_loss=lambda images: model.training_step(train_batch(images), 0),
        make_optimizer=model.configure_optimizers,
        infer=model,
    )

    # whole test set: Lightning trainer.test (forward per batch + AnomalyMetrics update, then
    # one exact compute: image AUROC/AP/F1max, pixel AUROC/AP/F1max, AU-PRO, legacy PRO)
    import lightning as L

    dm = AnomalyDataModule(format="mvtec", root=str(data_root), category="pill", image_size=size,
                           eval_batch_size=args.eval_batch, num_workers=0)
    dm.setup("test")  # decode the PNGs once (kdad caches decoded images): not timed
    model.test_metrics = type(model.test_metrics)(fpr_limit=0.3, legacy_pro=True).to(dev)
    trainer = L.Trainer(accelerator="gpu" if dev == "cuda" else "cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        trainer.test(model, datamodule=dm, verbose=False)
        total = time.perf_counter() - t0
    n = dm.num_test
    res["eval"] = {
        "images": n, "batch": args.eval_batch, "seconds": total, "images_per_s": n / total,
        "forward_seconds": model.inference_seconds,
        "metrics_and_overhead_seconds": total - model.inference_seconds,
        "metrics": model.test_results, "peak_rss_mib": mem.rss_mib, "cuda_peak_mib": mem.cuda_mib,
        "how": "Lightning trainer.test, test set decoded beforehand (kdad's cache), metrics incl. legacy PRO",
    }
    print(f"  eval {n} images: {total:.2f} s (forward {model.inference_seconds:.2f} s), "
          f"image AUROC {model.test_results.get('image_auroc', float('nan')):.3f}", flush=True)
    return res


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("kdad").setLevel(logging.WARNING)
    import kdad

    result: dict[str, Any] = {"impl": "kdad", "version": kdad.__version__, "machine": machine(args.device),
                              "args": {k: v for k, v in vars(args).items() if k != "json"},
                              "weights": "none (random init, no downloads)"}
    result["peak"] = measure_peak(args)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(args.data_dir) if args.data_dir else Path(tmp) / "testset"
        make_test_set(data_root, args.image_size, args.test_images)
        result["backbones"] = {}
        for backbone in args.backbones:
            r = bench_backbone(backbone, args, data_root)
            add_achieved_fractions(r, result["peak"], args.infer_batches)
            result["backbones"][backbone] = r
    result["machine"]["load_average_end"] = list(os.getloadavg())
    write_json(args.json, result)


if __name__ == "__main__":
    main()
