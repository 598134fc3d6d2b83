"""Every option of every config group composes and instantiates (DESIGN §4)."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from kdad.config import config_dir, instantiate_collection, instantiate_datamodule, register_resolvers
from kdad.data import AnomalyDataModule
from kdad.methods import AnomalyModule

CONF = Path(config_dir())
register_resolvers()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def compose_cfg(tmp_path: Path, overrides: list[str], name: str = "train") -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name=name,
            overrides=[f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", *overrides],
        )


def test_every_group_exists() -> None:
    for group in ("data", "method", "backbone", "trainer", "logger", "callbacks", "paths", "experiment", "hydra"):
        assert options(group), group


@pytest.mark.parametrize("option", options("data"))
def test_data_options(tmp_path: Path, option: str) -> None:
    extra = ["data.normal_dir=/nowhere"] if option == "folder" else []
    cfg = compose_cfg(tmp_path, [f"data={option}", *extra])
    datamodule = instantiate_datamodule(cfg.data)
    assert isinstance(datamodule, AnomalyDataModule)
    assert datamodule.dataset_name == cfg.data.format
    assert list(cfg.data.categories), "each dataset lists its categories for sweeps"
    assert cfg.data.category in cfg.data.categories


@pytest.mark.parametrize("option", options("backbone"))
def test_backbone_options_build_the_method(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"backbone={option}", "backbone.weights=none"])
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert isinstance(model, AnomalyModule)
    assert model.hparams["backbone"] == cfg.backbone.name


@pytest.mark.parametrize("option", options("method"))
def test_method_options(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"method={option}", "backbone=resnet18", "backbone.weights=none"])
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert isinstance(model, AnomalyModule)
    optimizer = model.configure_optimizers()
    assert optimizer is not None


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_options(tmp_path: Path, option: str) -> None:
    if option == "gpu":
        import torch

        if not torch.cuda.is_available():
            cfg = compose_cfg(tmp_path, [f"trainer={option}"])
            assert cfg.trainer.accelerator == "gpu"
            pytest.skip("no CUDA device: composed only")
    cfg = compose_cfg(tmp_path, [f"trainer={option}"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("option", options("logger"))
def test_logger_options(tmp_path: Path, option: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = compose_cfg(tmp_path, [f"logger={option}"])
    loggers = instantiate_collection(cfg.get("logger"))
    expected = {"none": 0, "many": 2}.get(option, 1)
    assert len(loggers) == expected
    if option == "wandb":
        assert cfg.logger.wandb.mode == "disabled"


@pytest.mark.parametrize("option", options("callbacks"))
def test_callback_options(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"callbacks={option}"])
    callbacks = instantiate_collection(cfg.get("callbacks"))
    assert all(isinstance(cb, L.Callback) for cb in callbacks)
    assert (len(callbacks) == 0) == (option == "none")


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_options(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"experiment={option}", "backbone.weights=none"])
    instantiate_datamodule(cfg.data)
    model = hydra.utils.instantiate(cfg.method, _convert_="all")
    assert isinstance(model, AnomalyModule)


@pytest.mark.parametrize("option", options("paths"))
def test_paths_options(tmp_path: Path, option: str) -> None:
    cfg = compose_cfg(tmp_path, [f"paths={option}"])
    assert Path(cfg.paths.log_dir).is_absolute() or cfg.paths.log_dir


@pytest.mark.parametrize("option", options("hydra"))
def test_hydra_options_give_unique_run_dirs(tmp_path: Path, option: str) -> None:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra={option}"], return_hydra_config=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    assert "${kdad_uid:}" in run_dir and "${kdad_uid:}" in sweep["dir"]
    assert "${hydra.job.num}" in sweep["subdir"]


def test_eval_config_composes(tmp_path: Path) -> None:
    cfg = compose_cfg(tmp_path, ["ckpt=/some/last.ckpt"], name="eval")
    assert cfg.ckpt == "/some/last.ckpt"
    assert cfg.get("data") is None
    cfg = compose_cfg(tmp_path, ["ckpt=x", "data=mvtec"], name="eval")
    instantiate_datamodule(cfg.data)


def test_rd_recipe_defaults(tmp_path: Path) -> None:
    """The default composition reproduces the RD paper's recipe (spec rd_urd.md §2.5, §2.9)."""
    cfg = compose_cfg(tmp_path, [])
    assert cfg.method._target_ == "kdad.methods.ReverseDistillation"
    assert cfg.backbone.name == "wide_resnet50_2" and cfg.backbone.weights == "imagenet"
    assert cfg.trainer.max_epochs == 200
    assert cfg.data.train_batch_size == 16 and cfg.data.image_size == 256
    assert cfg.method.optimizer.lr == 0.005 and list(cfg.method.optimizer.betas) == [0.5, 0.999]
    assert cfg.method.loss == "flat"
    assert cfg.method.anomaly_map.mode == "add" and cfg.method.anomaly_map.sigma == 4.0
    assert cfg.trainer.limit_val_batches == 0, "no test-set monitoring unless asked"
    assert cfg.seed == 111
