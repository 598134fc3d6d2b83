"""Speed of anomalib 2.7.0's Reverse Distillation, measured exactly like bench_kdad.py.

Runs in its own virtualenv (``experiments/bench/.venv-anomalib``, made by run.sh; anomalib is
never a kdad dependency). Model: ``ReverseDistillationModel(backbone, input_size,
layers=[layer1, layer2, layer3], anomaly_map_mode="add", pre_trained=False)`` (random init, no
downloads) with ``ReverseDistillationLoss``; Adam lr 0.005, betas (0.5, 0.999) on bottleneck +
decoder (anomalib's own recipe uses betas (0.5, 0.99): same cost). Inputs: the same seeded uint8
images as bench_kdad.py, ImageNet-normalised inside the timed region (what anomalib's
PreProcessor does before the model; its Resize is a no-op at the same size and is left out).
Inference: ``model.eval()(x)`` = encoder, bottleneck, decoder, anomaly map (per-level 1 - cos,
bilinear, add) + Gaussian blur (sigma 4) + amax score, an ``InferenceBatch``.
Whole test set: forward per batch + anomalib's metrics (image AUROC/AUPR/F1Max, pixel
AUROC/AUPR/F1Max, AUPRO fpr 0.3; the ``anomalib.metrics`` classes, updated per batch,
computed once), in a plain loop (no Lightning Engine; anomalib's Engine adds its own data
pipeline, post-processing and visualisation).

    experiments/bench/.venv-anomalib/bin/python experiments/bench/bench_anomalib.py [same options]
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

warnings.filterwarnings("ignore")  # anomalib and timm warn about deprecations on import

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss  # noqa: E402 - after the warnings filter and the sys.path entry
from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel  # noqa: E402 - after the warnings filter and the sys.path entry
from common import (  # noqa: E402 - after the warnings filter and the sys.path entry
    PeakMemory,
    add_achieved_fractions,
    imagenet_normalise,
    machine,
    measure_peak,
    measure_speed,
    parse_args,
    read_test_set,
    write_json,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def bench_backbone(backbone: str, args: Any, data_root: Path | None) -> dict[str, Any]:
    dev = args.device
    size = args.image_size
    print(f"== anomalib RD {backbone} {size}x{size} on {dev}, {args.threads} threads", flush=True)
    torch.manual_seed(0)
    model = ReverseDistillationModel(
        backbone=backbone,
        input_size=(size, size),
        layers=["layer1", "layer2", "layer3"],
        anomaly_map_mode="add",
        pre_trained=False,
    ).to(dev)
    loss_fn = ReverseDistillationLoss()
    trainable = list(model.bottleneck.parameters()) + list(model.decoder.parameters())
    res: dict[str, Any] = {
        "params": {
            "trainable": sum(p.numel() for p in trainable),
            "frozen": n_params(model.encoder),
            "bottleneck": n_params(model.bottleneck),
            "decoder": n_params(model.decoder),
        }
    }
    print(
        f"  parameters: trainable (bottleneck + decoder) {res['params']['trainable'] / 1e6:.2f} M, "
        f"encoder {res['params']['frozen'] / 1e6:.2f} M",
        flush=True,
    )

    def infer(images: torch.Tensor) -> Any:
        return model(imagenet_normalise(images))

    def train_loss(images: torch.Tensor) -> torch.Tensor:
        return loss_fn(*model(imagenet_normalise(images)))

    measure_speed(
        res,
        args,
        backbone,
        model,
        train_loss=train_loss,
        make_optimizer=lambda: torch.optim.Adam(trainable, lr=0.005, betas=(0.5, 0.999)),
        infer=infer,
    )

    if data_root is None or not data_root.exists():
        print("  eval: no --data-dir test set (bench_kdad.py writes it): skipped", flush=True)
        return res
    from anomalib.metrics import AUPR, AUPRO, AUROC, F1Max

    metrics = {
        "image_auroc": AUROC(fields=["pred_score", "gt_label"]),
        "image_ap": AUPR(fields=["pred_score", "gt_label"]),
        "image_f1_max": F1Max(fields=["pred_score", "gt_label"]),
        "pixel_auroc": AUROC(fields=["anomaly_map", "gt_mask"]),
        "pixel_ap": AUPR(fields=["anomaly_map", "gt_mask"]),
        "pixel_f1_max": F1Max(fields=["anomaly_map", "gt_mask"]),
        "aupro": AUPRO(fields=["anomaly_map", "gt_mask"], fpr_limit=0.3),
    }
    metrics = {k: m.to(dev) for k, m in metrics.items()}
    test_images, labels, masks = read_test_set(data_root, size)  # decoded beforehand: not timed
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        forward = 0.0
        for i in range(0, len(test_images), args.eval_batch):
            x = test_images[i : i + args.eval_batch].to(dev)
            f0 = time.perf_counter()
            with torch.inference_mode():
                out = infer(x)
            if dev == "cuda":
                torch.cuda.synchronize()
            forward += time.perf_counter() - f0
            batch = SimpleNamespace(
                pred_score=out.pred_score,
                anomaly_map=out.anomaly_map.squeeze(1),
                gt_label=labels[i : i + args.eval_batch].to(dev),
                gt_mask=masks[i : i + args.eval_batch, 0].to(dev).int(),
            )
            for m in metrics.values():
                m.update(batch)
        values = {k: float(m.compute()) for k, m in metrics.items()}
        total = time.perf_counter() - t0
    n = len(test_images)
    res["eval"] = {
        "images": n,
        "batch": args.eval_batch,
        "seconds": total,
        "images_per_s": n / total,
        "forward_seconds": forward,
        "metrics_and_overhead_seconds": total - forward,
        "metrics": values,
        "peak_rss_mib": mem.rss_mib,
        "cuda_peak_mib": mem.cuda_mib,
        "how": "plain loop: forward per batch + anomalib.metrics update, one compute (no legacy PRO)",
    }
    print(
        f"  eval {n} images: {total:.2f} s (forward {forward:.2f} s), image AUROC {values['image_auroc']:.3f}",
        flush=True,
    )
    return res


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warnings.filterwarnings("ignore")
    logging.getLogger("anomalib").setLevel(logging.ERROR)
    import anomalib

    result: dict[str, Any] = {
        "impl": "anomalib",
        "version": anomalib.__version__,
        "machine": machine(args.device),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "weights": "none (pre_trained=False, random init)",
    }
    result["peak"] = measure_peak(args)
    data_root = Path(args.data_dir) if args.data_dir else None
    result["backbones"] = {}
    for backbone in args.backbones:
        r = bench_backbone(backbone, args, data_root)
        add_achieved_fractions(r, result["peak"], args.infer_batches)
        result["backbones"][backbone] = r
    result["machine"]["load_average_end"] = list(os.getloadavg())
    write_json(args.json, result)


if __name__ == "__main__":
    main()
