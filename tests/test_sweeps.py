"""Sweeps: launcher configs compose, ready studies carry the RD recipe, `data.category=all`
expands to each dataset's categories, and a re-run of a sweep skips its finished jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import setup_globals
from hydra.types import HydraContext, RunMode
from omegaconf import DictConfig, OmegaConf

from kdad.config import config_dir, register_resolvers
from kdad.launch import StudySweeper

CONF = Path(config_dir())
register_resolvers()

MVTEC = [
    "carpet",
    "grid",
    "leather",
    "tile",
    "wood",
    "bottle",
    "cable",
    "capsule",
    "hazelnut",
    "metal_nut",
    "pill",
    "screw",
    "toothbrush",
    "transistor",
    "zipper",
]  # MVTec AD's 15 categories (textures, then objects)
DATASETS = {
    "mvtec_rd": ("mvtec", MVTEC),
    "visa_rd": (
        "visa",
        [
            "candle",
            "capsules",
            "cashew",
            "chewinggum",
            "fryum",
            "macaroni1",
            "macaroni2",
            "pcb1",
            "pcb2",
            "pcb3",
            "pcb4",
            "pipe_fryum",
        ],
    ),
    "mpdd_rd": ("mpdd", ["bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes"]),
    "btad_rd": ("btad", ["01", "02", "03"]),
}


def compose_hydra(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


# ------------------------------------------------------------------ launcher configs


def test_slurm_launcher_composes_with_documented_keys() -> None:
    cfg = compose_hydra(
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=2",
            "hydra.launcher.tasks_per_node=2",
            "hydra.launcher.account=proj",
            "hydra.launcher.qos=low",
            "hydra.launcher.timeout_min=90",
            "+hydra.launcher.additional_parameters.mail-type=END",
        ]
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 2, 2)
    assert (launcher.account, launcher.qos, launcher.timeout_min) == ("proj", "low", 90)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0  # requeue on time-out/preemption
    assert launcher.array_parallelism > 0 and launcher.cpus_per_task > 0 and launcher.mem_gb > 0
    assert launcher.additional_parameters["mail-type"] == "END"
    assert str(OmegaConf.to_container(launcher, resolve=False)["submitit_folder"]).startswith("${hydra.sweep.dir}")


@pytest.mark.parametrize("name", ["slurm", "slurm_local", "gpus"])
def test_every_launcher_key_is_commented(name: str) -> None:
    lines = (CONF / "hydra" / "launcher" / f"{name}.yaml").read_text().splitlines()
    keys = [line for line in lines if re.match(r"^[a-z_]+:", line)]
    assert keys
    undocumented = [k for k in keys if "#" not in k and k.split(":")[0] not in ("defaults",)]
    if name == "gpus":  # joblib's own options are documented together under one heading
        undocumented = [
            k
            for k in undocumented
            if k.split(":")[0]
            not in (
                "backend",
                "prefer",
                "require",
                "verbose",
                "pre_dispatch",
                "batch_size",
                "temp_folder",
                "max_nbytes",
                "mmap_mode",
            )
        ]
    if name == "slurm_local":
        undocumented = [k for k in undocumented if k.split(":")[0] not in ("nodes", "name", "stderr_to_stdout")]
    assert undocumented == [], undocumented


def test_slurm_launcher_instantiates(tmp_path: Path) -> None:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    cfg = compose_hydra(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, SlurmLauncher)
    assert launcher.params["submitit_folder"] == f"{tmp_path}/.submitit/%j"


def test_local_submitit_and_gpu_launchers_instantiate() -> None:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

    cfg = compose_hydra(["hydra/launcher=slurm_local"])
    assert isinstance(hydra.utils.instantiate(cfg.hydra.launcher), LocalLauncher)
    cfg = compose_hydra(["hydra/launcher=gpus", "hydra.launcher.gpus=[4,5]"])
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "GpuSlotLauncher" and launcher.gpus_option == [4, 5]
    assert launcher.joblib_kwargs["n_jobs"] is None  # one per GPU


def test_default_sweeper_is_kdads_study_sweeper() -> None:
    cfg = compose_hydra([])
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.kdad_plugins.StudySweeper"
    from hydra_plugins.kdad_plugins import StudySweeper as Plugin

    assert issubclass(Plugin, StudySweeper)


def test_train_config_skips_finished_jobs_by_default() -> None:
    assert compose_hydra([]).skip_finished is True


# ------------------------------------------------------------------ ready studies, data.category=all


@pytest.mark.parametrize("study", sorted(DATASETS))
def test_ready_study_uses_the_rd_recipe_on_every_category(study: str) -> None:
    data, categories = DATASETS[study]
    cfg = compose_hydra([f"experiment={study}"])
    assert cfg.data.format == data and list(cfg.data.categories) == categories
    assert cfg.hydra.sweeper.params["data.category"] == "all"
    assert cfg.method._target_ == "kdad.methods.ReverseDistillation"
    assert (cfg.backbone.name, cfg.backbone.weights) == ("wide_resnet50_2", "imagenet")
    assert (cfg.trainer.max_epochs, cfg.data.image_size, cfg.data.train_batch_size, cfg.seed) == (200, 256, 16, 111)
    assert cfg.method.optimizer.lr == 0.005 and list(cfg.method.optimizer.betas) == [0.5, 0.999]


def sweep_jobs(args: list[str]) -> list[list[str]]:
    """The jobs kdad's sweeper makes of a `kdad-train -m <args>` command line (no job runs)."""
    setup_globals()
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONF)))
    cfg = loader.load_configuration("train", overrides=[*args, "hydra.mode=MULTIRUN"], run_mode=RunMode.MULTIRUN)
    params = cfg.hydra.sweeper.params
    sweeper = StudySweeper(max_batch_size=None, params=OmegaConf.to_container(params) if params else None)  # type: ignore[arg-type]
    sweeper.config, sweeper.hydra_context = cfg, HydraContext(config_loader=loader, callbacks=None)  # type: ignore[arg-type]
    parser = OverridesParser.create(config_loader=loader)
    (jobs,) = sweeper.split_arguments(parser.parse_overrides(sweeper._parse_config() + args), None)
    return jobs


def _value(job: list[str], key: str) -> str:
    return OverridesParser.create().parse_override(next(o for o in job if o.startswith(f"{key}="))).value()


@pytest.mark.parametrize("study", sorted(DATASETS))
def test_ready_study_sweeps_every_category(study: str, tmp_path: Path) -> None:
    jobs = sweep_jobs([f"experiment={study}", f"paths.log_dir={tmp_path}"])
    assert [_value(j, "data.category") for j in jobs] == DATASETS[study][1]
    sweep_dirs = {_value(j, "hydra.sweep.dir") for j in jobs}
    assert len(sweep_dirs) == 1 and sweep_dirs.pop().startswith(f"{tmp_path}/{study}/multiruns/")
    assert {_value(j, "hydra.sweep.subdir") for j in jobs} == {"${oc.select:data.category,job}"}


def test_category_all_on_the_command_line_follows_each_dataset(tmp_path: Path) -> None:
    jobs = sweep_jobs(["data=mpdd,btad", "data.category=all", "method=rd", f"paths.log_dir={tmp_path}"])
    pairs = [(_value(j, "data"), _value(j, "data.category")) for j in jobs]
    assert pairs == [("mpdd", c) for c in DATASETS["mpdd_rd"][1]] + [("btad", c) for c in DATASETS["btad_rd"][1]]
    assert {_value(j, "hydra.sweep.subdir") for j in jobs} == {
        "mpdd_${oc.select:data.category,job}",
        "btad_${oc.select:data.category,job}",
    }


def test_a_study_runs_only_the_categories_given(tmp_path: Path) -> None:
    jobs = sweep_jobs(["experiment=mvtec_rd", "data.category=bottle,cable", "backbone=resnet18,wide_resnet50_2"])
    assert [(_value(j, "backbone"), _value(j, "data.category")) for j in jobs] == [
        ("resnet18", "bottle"),
        ("wide_resnet50_2", "bottle"),
        ("resnet18", "cable"),
        ("wide_resnet50_2", "cable"),
    ]


# ------------------------------------------------------------------ resumable sweeps (real runs)


def _sweep(demo_root: Path, tmp_path: Path, study: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    args = [
        "experiment=demo",
        "hydra.sweeper.params=null",
        f"data.root={demo_root}",
        "data.categories=[weave,washer]",
        "data.category=all",
        "data.image_size=32",
        "backbone.weights=none",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "callbacks=none",
        "logger=none",
        f"paths.log_dir={tmp_path / 'out'}",
        "print_config=false",
        f"hydra.sweep.dir={study}",
        *extra,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "kdad.cli.train", "-m", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_rerun_trains_only_the_unfinished_jobs(demo_root: Path, tmp_path: Path) -> None:
    study = tmp_path / "studies" / "demo_rd"
    _sweep(demo_root, tmp_path, study)
    weave, washer = study / "weave" / "results.json", study / "washer" / "results.json"
    assert weave.is_file() and washer.is_file()  # job folders named by category, not job number
    first = {p: json.loads(p.read_text())["train_seconds"] for p in (weave, washer)}
    washer_mtime = washer.stat().st_mtime_ns

    weave.unlink()  # the study stopped before weave finished
    proc = _sweep(demo_root, tmp_path, study)
    assert f"skipped: finished results in {washer}" in proc.stdout
    assert f"results: {weave}" in proc.stdout and f"results: {washer}" not in proc.stdout
    assert washer.stat().st_mtime_ns == washer_mtime and weave.is_file()
    assert json.loads(weave.read_text())["train_seconds"] != first[weave]

    proc = _sweep(demo_root, tmp_path, study, "skip_finished=false")
    assert "skipped" not in proc.stdout
    assert f"results: {weave}" in proc.stdout and f"results: {washer}" in proc.stdout
    assert washer.stat().st_mtime_ns != washer_mtime
    assert sorted(p.parent.name for p in study.rglob("results.json")) == ["washer", "weave"]
