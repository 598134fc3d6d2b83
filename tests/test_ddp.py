"""trainer=ddp: one model trained by several processes (here 2 CPU processes, gloo backend);
evaluation on one process sees every test image exactly once, and the reported metrics equal a
single-process evaluation of the saved weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from kdad.callbacks import InferenceOptimization
from kdad.checkpoint import load_model
from kdad.cli.common import end_distributed, single_process_trainer
from kdad.config import config_dir, register_resolvers
from kdad.data import AnomalyDataModule, generate_demo_dataset

register_resolvers()

#: 11 test images: with 2 processes a DistributedSampler would repeat one of them
N_TEST_GOOD, N_TEST_DEFECT = 5, 6


def compose_train(tmp_path: Path, overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=[f"paths.output_dir={tmp_path}", *overrides])


def test_ddp_config_composes() -> None:
    cfg = compose_train(Path("/tmp"), ["trainer=ddp"])
    assert cfg.trainer.strategy == "ddp"
    assert cfg.trainer.sync_batchnorm is False
    assert cfg.trainer.devices == "auto" and cfg.trainer.num_nodes == 1
    assert cfg.trainer.max_epochs == 200, "the method's recipe still applies"


def test_the_evaluating_trainer_is_one_device_with_the_same_precision(tmp_path: Path) -> None:
    cfg = compose_train(
        tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=bf16-mixed"]
    )
    import hydra

    fitted: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert fitted.world_size == 2
    evaluator = single_process_trainer(cfg.trainer, fitted, callbacks=[], loggers=[])
    assert evaluator.world_size == 1 and evaluator.num_devices == 1
    assert type(evaluator.strategy).__name__ == "SingleDeviceStrategy"
    assert str(evaluator.precision) == "bf16-mixed"


def test_end_distributed_destroys_the_process_group(tmp_path: Path) -> None:
    """After it, torchmetrics sees no process group and computes on local data only."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    end_distributed(trainer, tmp_path)
    assert not dist.is_initialized()
    end_distributed(trainer, tmp_path)  # nothing to do: no error


@pytest.mark.slow
@pytest.mark.numerics
def test_ddp_training_reports_single_process_metrics_of_its_weights(tmp_path: Path) -> None:
    root = generate_demo_dataset(
        tmp_path / "data",
        categories=["weave"],
        image_size=64,
        n_train=16,
        n_test_good=N_TEST_GOOD,
        n_test_defect=N_TEST_DEFECT,
    )
    out = tmp_path / "out"
    # one thread per process, as in the reference evaluation below: the same float32 kernels
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch_home"),
        "WANDB_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "kdad.cli.train",
        "experiment=demo",
        "hydra.sweeper.params=null",
        f"data.root={root}",
        "data.category=weave",
        "data.image_size=32",
        "data.train_batch_size=4",
        "backbone.weights=none",
        "trainer.max_epochs=2",
        "callbacks.progress_bar=null",
        f"paths.log_dir={out}",
        "print_config=false",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr

    # one run folder (Lightning re-ran the command for rank 1 inside rank 0's folder)
    runs = list((out / "demo" / "runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    (results_path,) = list(out.rglob("results.json"))
    assert results_path.parent == run_dir
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert len(list(out.rglob("anomaly_maps.png"))) == 1

    results = json.loads(results_path.read_text())
    assert results["training_processes"] == 2
    assert results["num_test_images"] == N_TEST_GOOD + N_TEST_DEFECT
    # 16 images, batch 4, split over 2 processes: 2 steps per epoch
    assert results["epochs"] == 2 and results["global_steps"] == 4

    # the same weights, evaluated by a plain one-process Trainer with kdad-train's inference
    # conversion (channels-last) on one thread: the same kernels on the same tensors give the
    # same maps, so the metrics must agree exactly (contiguous weights gave a pixel AP 1.7e-5
    # apart on AVX-512 kernels: a rank metric moves through reordered float32 near-ties)
    model, meta = load_model(results["checkpoint"])
    datamodule = AnomalyDataModule(**meta["datamodule"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path / "eval",
        callbacks=[InferenceOptimization()],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.test(model, datamodule=datamodule, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert set(model.test_results) == set(results["metrics"])
    for key, value in results["metrics"].items():
        assert model.test_results[key] == value, key
    assert model.inference_images == N_TEST_GOOD + N_TEST_DEFECT

    # what a DDP test loop would have evaluated: 12 images, one of them twice
    sampler = torch.utils.data.DistributedSampler(
        range(N_TEST_GOOD + N_TEST_DEFECT), num_replicas=2, rank=0, shuffle=False
    )
    assert sampler.total_size == N_TEST_GOOD + N_TEST_DEFECT + 1


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        ([], False),
        (["trainer=gpu"], False),
        (["trainer=ddp"], True),
        (["trainer.devices=2"], True),
        (["trainer.devices=[0,1]"], True),
    ],
)
def test_evaluation_refuses_several_processes(tmp_path: Path, overrides: list[str], refused: bool) -> None:
    from kdad.cli.common import check_single_device_evaluation
    from kdad.errors import KdadError

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[f"paths.output_dir={tmp_path}", "ckpt=x", *overrides])
    if refused:
        with pytest.raises(KdadError, match="kdad-eval evaluates on one device"):
            check_single_device_evaluation(cfg)
    else:
        check_single_device_evaluation(cfg)


@pytest.mark.parametrize(("unused", "expected"), [(True, True), (False, False)])
def test_methods_with_unused_parameters_get_ddp_unused_parameter_detection(
    tmp_path: Path, unused: bool, expected: bool
) -> None:
    """URD's separate teacher/student backward passes (and RD's legacy conv4) leave parameters
    without gradients: kdad-train switches trainer.strategy=ddp to find unused parameters
    (a 2-process URD run on CPU failed without it, and trains with it)."""
    from types import SimpleNamespace

    from kdad.cli.common import build_trainer
    from kdad.methods import ReverseDistillation, UnlockedReverseDistillation

    assert UnlockedReverseDistillation.ddp_unused_parameters is True
    assert ReverseDistillation(backbone="resnet18", weights="none", legacy_unused_conv4=True).ddp_unused_parameters
    assert not ReverseDistillation(backbone="resnet18", weights="none").ddp_unused_parameters
    cfg = compose_train(
        tmp_path, ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "callbacks=none", "logger=none"]
    )
    model = SimpleNamespace(ddp_unused_parameters=unused, method_name="stub")
    trainer = build_trainer(cfg, model)
    assert trainer.strategy._ddp_kwargs.get("find_unused_parameters", False) is expected
