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
    random_images,
    timed_median,
    write_json,
)

from kdad.data import AnomalyDataModule, generate_demo_dataset
from kdad.data.batch import Batch
from kdad.methods import ReverseDistillation


def make_test_set(root: Path, size: int, n: int) -> Path:
    good = max(1, round(0.4 * n))
    generate_demo_dataset(
        root, categories=["pill"], image_size=size, n_train=16, n_test_good=good, n_test_defect=max(1, n - good)
    )
    return root


def train_batch(images: torch.Tensor, paths: list[str] | None = None) -> Batch:
    """A training batch; with ``paths`` the teacher-feature cache can key its entries (without,
    every step runs the encoder, as in the first epoch)."""
    n = images.shape[0]
    return Batch(
        image=images,
        label=torch.zeros(n, dtype=torch.long, device=images.device),
        mask=torch.zeros(n, 1, *images.shape[-2:], device=images.device),
        path=paths or [],
    )


def measure_cached_training(res: dict[str, Any], args: Any, model: ReverseDistillation) -> None:
    """Lever: training with the teacher-feature cache warm (every epoch after the first)."""
    dev, size = args.device, args.image_size
    model.train()
    optimizer = model.configure_optimizers()
    images = random_images(args.train_batch, size, seed=1).to(dev)
    paths = [f"train/{i}.png" for i in range(args.train_batch)]

    def step() -> None:
        loss = model.training_step(train_batch(images, paths), 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory(dev) as mem:
        sec, times = timed_median(step, dev, args.warmup, args.steps)  # warm-up fills the cache
    assert model.feature_cache is not None and model.feature_cache.hits > 0
    res["train_fp32_cached"] = {
        "batch": args.train_batch,
        "s_per_step": sec,
        "step_times": times,
        "images_per_s": args.train_batch / sec,
        "peak_rss_mib": mem.rss_mib,
        "cache_gib": model.feature_cache.bytes / 2**30,
    }
    print(f"  train fp32, teacher cached: {args.train_batch / sec:.2f} img/s ({sec:.2f} s/step)", flush=True)
    model.feature_cache.clear()


def measure_fast_inference(res: dict[str, Any], args: Any, model: ReverseDistillation) -> None:
    """Levers: channels-last inference, the largest batch in chunks, and (``--compile``)
    torch.compile with freezing. The model stays converted afterwards."""
    dev, size = args.device, args.image_size
    model.eval()
    batches = sorted(set(args.infer_batches))
    for name in ["cl", "compiled"] if args.compile else ["cl"]:
        if name == "cl":
            model.optimize_for_inference(channels_last=True)
        else:
            start = time.perf_counter()
            model.optimize_for_inference(channels_last=True, compile=True)
            with torch.no_grad():
                for b in batches:  # compile each batch size before timing
                    model(random_images(b, size, seed=2).to(dev))
            res["compile_seconds"] = time.perf_counter() - start
        grad = torch.no_grad if name == "compiled" else torch.inference_mode
        for b in batches:
            x = random_images(b, size, seed=2).to(dev)
            with grad():
                sec, times = timed_median(lambda x=x: model(x), dev, 1, max(args.infer_reps, -(-8 // b)))
            res[f"infer_{name}_b{b}"] = {"batch": b, "s_per_call": sec, "call_times": times, "images_per_s": b / sec}
            print(f"  infer {name} batch {b}: {b / sec:.2f} img/s", flush=True)
        if name == "cl" and max(batches) > args.infer_chunk > 0:
            b = max(batches)
            x = random_images(b, size, seed=2).to(dev)
            with torch.inference_mode():
                sec, times = timed_median(
                    lambda x=x: [model(c) for c in x.split(args.infer_chunk)], dev, 1, args.infer_reps
                )
            res[f"infer_cl_b{b}_chunked"] = {
                "batch": b,
                "chunk": args.infer_chunk,
                "s_per_call": sec,
                "call_times": times,
                "images_per_s": b / sec,
            }
            print(f"  infer cl batch {b} in chunks of {args.infer_chunk}: {b / sec:.2f} img/s", flush=True)


#: URD's synthetic anomalies (conf/method/urd.yaml) with procedural textures, for the loader row
URD_SYNTHESIS = {
    "texture_source": None,
    "probability": 1.0,
    "foreground": "none",
    "texture_augment": "none",
    "rotate_image_probability": 0.0,
    "beta_max": 0.8,
    "perlin_scale_exp": [0, 5],
    "threshold": 0.5,
    "rotate_deg": 90.0,
}


def measure_loader(args: Any, data_root: Path) -> dict[str, Any]:
    """Images/s the training data path delivers (decoded-image cache -> batches), with and
    without URD's synthetic anomalies, for 0 and 2 loader workers: what a GPU would wait for."""
    out: dict[str, Any] = {}
    for synthesis in (None, URD_SYNTHESIS):
        for workers in (0, 2):
            dm = AnomalyDataModule(
                format="mvtec",
                root=str(data_root),
                category="pill",
                image_size=args.image_size,
                train_batch_size=args.train_batch,
                num_workers=workers,
                synthesis=synthesis,
            )
            dm.setup("fit")  # decode once (not timed)
            loader = dm.train_dataloader()
            n, t0, epochs = 0, time.perf_counter(), 0
            while n < 4 * args.train_batch or epochs < 2:
                if hasattr(loader.sampler, "set_epoch"):
                    loader.sampler.set_epoch(epochs)
                for batch in loader:
                    n += len(batch)
                epochs += 1
            sec = time.perf_counter() - t0
            key = f"{'synthetic' if synthesis else 'plain'}_workers{workers}"
            out[key] = {"images": n, "seconds": sec, "images_per_s": n / sec}
            print(f"  loader {key}: {n / sec:.0f} img/s", flush=True)
    return out


class _TestOutputs:
    """The test loop's scores and maps with their labels and masks (a Lightning callback)."""

    def __init__(self) -> None:
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.maps: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []

    def collected(self) -> dict[str, torch.Tensor]:
        return {name: torch.cat(getattr(self, name)).cpu() for name in ("scores", "labels", "maps", "masks")}


def _collector() -> Any:
    import lightning as L

    class Collector(_TestOutputs, L.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
            self.scores.append(outputs["score"].detach())
            self.maps.append(outputs["anomaly_map"].detach())
            self.labels.append(batch.label)
            self.masks.append(batch.mask)

    return Collector()


def metric_tolerances(plain: dict[str, torch.Tensor], fast: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far image / pixel AUROC may move between the two evaluations, from the largest score
    and map difference they showed (kdad.metrics.auroc_change_bound), with those differences."""
    from kdad.metrics import auroc_change_bound

    score_change = float((fast["scores"] - plain["scores"]).abs().max())
    map_change = float((fast["maps"] - plain["maps"]).abs().max())
    return {
        "max_abs_score_difference": score_change,
        "max_abs_map_difference": map_change,
        "image_auroc": auroc_change_bound(plain["scores"], plain["labels"], score_change),
        "pixel_auroc": auroc_change_bound(plain["maps"], plain["masks"], map_change),
    }


def evaluate(
    model: ReverseDistillation, args: Any, data_root: Path, levers: bool
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One Lightning trainer.test over the whole generated test set, timed (with kdad's default
    inference levers when ``levers``: the callback of conf/callbacks/default.yaml); the result
    and the test loop's outputs."""
    import lightning as L

    from kdad.callbacks import InferenceOptimization

    dev, size = args.device, args.image_size
    dm = AnomalyDataModule(
        format="mvtec",
        root=str(data_root),
        category="pill",
        image_size=size,
        eval_batch_size=args.eval_batch,
        num_workers=0,
    )
    dm.setup("test")  # decode the PNGs once (kdad caches decoded images): not timed
    model.test_metrics = type(model.test_metrics)(fpr_limit=0.3, legacy_pro=True).to(dev)
    trainer = L.Trainer(
        accelerator="gpu" if dev == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[collector := _collector(), *([InferenceOptimization(channels_last=True)] if levers else [])],
    )
    with PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        trainer.test(model, datamodule=dm, verbose=False)
        total = time.perf_counter() - t0
    n = dm.num_test
    print(
        f"  eval {n} images{' (channels-last)' if levers else ''}: {total:.2f} s "
        f"(forward {model.inference_seconds:.2f} s), image AUROC "
        f"{model.test_results.get('image_auroc', float('nan')):.4f}, pixel AUROC "
        f"{model.test_results.get('pixel_auroc', float('nan')):.4f}",
        flush=True,
    )
    return {
        "images": n,
        "batch": args.eval_batch,
        "seconds": total,
        "images_per_s": n / total,
        "forward_seconds": model.inference_seconds,
        "metrics_and_overhead_seconds": total - model.inference_seconds,
        "metrics": dict(model.test_results),
        "peak_rss_mib": mem.rss_mib,
        "cuda_peak_mib": mem.cuda_mib,
        "how": "Lightning trainer.test, test set decoded beforehand (kdad's cache), metrics incl. legacy PRO",
    }, collector.collected()


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
        res,
        args,
        backbone,
        model,
        train_loss=lambda images: model.training_step(train_batch(images), 0),
        make_optimizer=model.configure_optimizers,
        infer=model,
    )

    # whole test set: Lightning trainer.test (forward per batch + AnomalyMetrics update, then
    # one exact compute: image AUROC/AP/F1max, pixel AUROC/AP/F1max, AU-PRO, legacy PRO); first
    # the plain model, then with kdad's default inference levers on the same weights
    measure_cached_training(res, args, model)
    res["eval"], plain = evaluate(model, args, data_root, levers=False)
    measure_fast_inference(res, args, model)
    res["eval_levers"], fast = evaluate(model, args, data_root, levers=True)
    res["eval_levers"]["metric_deltas"] = {
        key: res["eval_levers"]["metrics"][key] - value for key, value in res["eval"]["metrics"].items()
    }
    # channels-last changes float32 rounding: AUROC may move only through pairs of scores that
    # close together (the bound), never more
    res["eval_levers"]["auroc_tolerances"] = metric_tolerances(plain, fast)
    return res


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("kdad").setLevel(logging.WARNING)
    import kdad

    result: dict[str, Any] = {
        "impl": "kdad",
        "version": kdad.__version__,
        "machine": machine(args.device),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "weights": "none (random init, no downloads)",
    }
    result["peak"] = measure_peak(args)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = Path(args.data_dir) if args.data_dir else Path(tmp) / "testset"
        make_test_set(data_root, args.image_size, args.test_images)
        result["backbones"] = {}
        for backbone in args.backbones:
            r = bench_backbone(backbone, args, data_root)
            add_achieved_fractions(r, result["peak"], args.infer_batches)
            result["backbones"][backbone] = r
        result["loader"] = measure_loader(args, data_root)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    write_json(args.json, result)


if __name__ == "__main__":
    main()
