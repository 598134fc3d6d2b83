"""kdad.launch: the DDP-in-multirun guard, GPU slots, job folder names, finished jobs, and the
SLURM machinery (submitit) running a real 2-job sweep with its local executor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from kdad import launch
from kdad.errors import KdadError
from kdad.launch import (
    StudySweeper,
    choose_gpus,
    claim_gpu_slot,
    config_differences,
    finished_results,
    job_dir_names,
    launch_problem,
    override_value,
    pin_process_to_gpu,
    preferred_slot,
    visible_gpus,
)

# ------------------------------------------------------------------ DDP inside a multirun


@pytest.mark.parametrize(
    ("mode", "trainer", "env", "safe"),
    [
        (RunMode.RUN, {"devices": 4, "strategy": "ddp"}, {}, True),  # single runs may re-launch
        (None, {"devices": -1}, {}, True),  # outside Hydra
        (RunMode.MULTIRUN, {"devices": 1}, {}, True),
        (RunMode.MULTIRUN, {"devices": "1"}, {}, True),
        (RunMode.MULTIRUN, {"devices": [3]}, {}, True),  # one GPU, by index
        (RunMode.MULTIRUN, {"devices": 1, "strategy": "auto"}, {}, True),
        (RunMode.MULTIRUN, {"devices": 2}, {}, False),
        (RunMode.MULTIRUN, {"devices": -1}, {}, False),
        (RunMode.MULTIRUN, {"devices": "auto"}, {}, False),
        (RunMode.MULTIRUN, {"devices": "0,1"}, {}, False),
        (RunMode.MULTIRUN, {"devices": [0, 1]}, {}, False),
        (RunMode.MULTIRUN, {"devices": 1, "strategy": "ddp"}, {}, False),
        (RunMode.MULTIRUN, {"devices": 1, "strategy": "ddp_spawn"}, {}, False),
        ("MULTIRUN", {"devices": 2}, {}, False),
        # SLURM started one task per GPU: Lightning joins them instead of re-launching
        (RunMode.MULTIRUN, {"devices": 2, "strategy": "ddp"}, {"SLURM_NTASKS": "2"}, True),
        (RunMode.MULTIRUN, {"devices": 1, "strategy": "ddp"}, {"SLURM_NTASKS": "1"}, True),
        (RunMode.MULTIRUN, {"devices": 2, "num_nodes": 2, "strategy": "ddp"}, {"SLURM_NTASKS": "4"}, True),
        (RunMode.MULTIRUN, {"devices": 2, "strategy": "ddp"}, {"SLURM_NTASKS": "1"}, False),
        (RunMode.MULTIRUN, {"devices": 4, "strategy": "ddp"}, {"SLURM_NTASKS": "2"}, False),
        (RunMode.MULTIRUN, {"devices": -1, "strategy": "ddp"}, {"SLURM_NTASKS": "8"}, False),  # count unknown
        # trainer=ddp (devices auto) under SLURM: the job's GPUs on the node are the devices
        (
            RunMode.MULTIRUN,
            {"devices": "auto", "strategy": "ddp"},
            {"SLURM_NTASKS": "4", "SLURM_GPUS_ON_NODE": "4"},
            True,
        ),
        (
            RunMode.MULTIRUN,
            {"devices": "auto", "strategy": "ddp"},
            {"SLURM_NTASKS": "1", "SLURM_GPUS_ON_NODE": "4"},
            False,
        ),
    ],
)
def test_launch_problem(mode: object, trainer: dict, env: dict, safe: bool) -> None:
    problem = launch_problem(mode, trainer, env)  # type: ignore[arg-type]
    assert (problem is None) == safe, problem
    if problem:
        assert "\n" not in problem
        assert "one-GPU jobs" in problem and "hydra/launcher=slurm" in problem and "tasks_per_node" in problem


def test_check_launch_raises_kdad_error_in_a_multirun(monkeypatch: pytest.MonkeyPatch) -> None:
    class MultirunHydraConfig:  # what HydraConfig says inside a job of `kdad-train -m`
        @staticmethod
        def initialized() -> bool:
            return True

        @staticmethod
        def get() -> object:
            return OmegaConf.create({"mode": "MULTIRUN"})

    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    monkeypatch.setattr(launch, "HydraConfig", MultirunHydraConfig)
    launch.check_launch(OmegaConf.create({"trainer": {"devices": 1}, "data": {"category": "a"}}))
    with pytest.raises(KdadError, match=r"trainer.devices=2"):
        launch.check_launch(OmegaConf.create({"trainer": {"devices": 2, "strategy": "ddp"}}))
    monkeypatch.setenv("SLURM_NTASKS", "2")
    launch.check_launch(OmegaConf.create({"trainer": {"devices": 2, "strategy": "ddp"}}))


def test_category_all_outside_a_sweep_is_a_user_error() -> None:
    with pytest.raises(KdadError, match="-m"):
        launch.check_launch(OmegaConf.create({"trainer": {"devices": 1}, "data": {"category": "all"}}))


# ------------------------------------------------------------------ one node, many GPUs


def test_visible_gpus() -> None:
    assert visible_gpus({}, 3) == ["0", "1", "2"]
    assert visible_gpus({}, 0) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 8) == ["4", "5", "6", "7"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": " 2, 0 "}, 8) == ["2", "0"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, 8) == []  # empty: no GPU at all


def test_choose_gpus() -> None:
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert choose_gpus(None, env, 0) == ["4", "5", "6", "7"]
    assert choose_gpus(2, env, 0) == ["4", "5"]
    assert choose_gpus([5, 7], env, 0) == ["5", "7"]
    assert choose_gpus("1,3", {}, 4) == ["1", "3"]
    with pytest.raises(KdadError, match=r"hydra.launcher.gpus=5"):
        choose_gpus(5, env, 0)
    with pytest.raises(KdadError, match="twice"):
        choose_gpus([1, 1], env, 0)


def test_job_numbers_to_slots_and_gpus() -> None:
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    slots = [preferred_slot(job, len(gpus)) for job in range(10)]
    assert slots == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert [gpus[s] for s in slots[:5]] == ["4", "5", "6", "7", "4"]
    with pytest.raises(ValueError):
        preferred_slot(3, 0)


def test_claim_gpu_slot_takes_the_preferred_free_slot(tmp_path: Path) -> None:
    first, h1 = claim_gpu_slot(tmp_path, 3, preferred=1)
    second, h2 = claim_gpu_slot(tmp_path, 3, preferred=1)  # 1 is taken: the next free one
    third, h3 = claim_gpu_slot(tmp_path, 3, preferred=1)  # wraps around
    assert (first, second, third) == (1, 2, 0)
    with pytest.raises(TimeoutError):
        claim_gpu_slot(tmp_path, 3, preferred=0, poll_s=0.01, timeout_s=0.05)
    h2.close()  # the job on slot 2 ended
    assert claim_gpu_slot(tmp_path, 3, preferred=0, poll_s=0.01, timeout_s=1.0)[0] == 2
    assert (tmp_path / "1.lock").read_text().strip() == str(os.getpid())
    h1.close()
    h3.close()


def test_a_slot_held_by_another_process_is_skipped(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import time; from pathlib import Path; from kdad.launch import claim_gpu_slot;"
                f" s, h = claim_gpu_slot(Path({str(tmp_path)!r}), 2, 0); print(s, flush=True); time.sleep(30)"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "0"
        slot, handle = claim_gpu_slot(tmp_path, 2, preferred=0)
        assert slot == 1
        handle.close()
    finally:
        holder.kill()
        holder.wait()
    slot, handle = claim_gpu_slot(tmp_path, 2, preferred=0, poll_s=0.01, timeout_s=5)  # freed by its death
    assert slot == 0
    handle.close()


def test_a_worker_keeps_its_gpu_for_all_its_jobs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_PROCESS_GPU", None)
    env: dict[str, str] = {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    gpus = visible_gpus(env)
    assert pin_process_to_gpu(gpus, tmp_path, job_num=6, env=env) == "6"
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
    assert pin_process_to_gpu(gpus, tmp_path, job_num=1, env=env) == "6"  # same worker, same GPU
    handle = launch._PROCESS_GPU[2]  # type: ignore[index]
    monkeypatch.setattr(launch, "_PROCESS_GPU", None)  # a second worker
    other: dict[str, str] = {}
    assert pin_process_to_gpu(gpus, tmp_path, job_num=2, env=other) == "7"  # slot 2 is held: next one
    launch._PROCESS_GPU[2].close()  # type: ignore[index]
    handle.close()


def test_gpu_slot_task_pins_before_running_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_PROCESS_GPU", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    seen = []
    task = launch.GpuSlotTask(
        lambda cfg: seen.append(os.environ["CUDA_VISIBLE_DEVICES"]) or 42, ["2", "3"], str(tmp_path)
    )
    assert task(OmegaConf.create({})) == 42
    assert seen == ["2"]
    launch._PROCESS_GPU[2].close()  # type: ignore[index]


# ------------------------------------------------------------------ job folder names


def test_job_folder_names_use_the_swept_values() -> None:
    jobs = [
        ["data.category=a", "backbone=resnet18", "method=rd"],
        ["data.category=a", "backbone=wide_resnet50_2", "method=rd"],
    ]
    assert job_dir_names(jobs, ["backbone"]) == ["resnet18", "wide_resnet50_2"]
    jobs = [["data.category=a", "method=rd"], ["data.category=b", "method=rd"]]
    assert job_dir_names(jobs, ["data.category"]) == ["", ""]  # the job appends its category
    jobs = [["method=rd", "seed=1", "backbone=r18"], ["backbone=r18", "seed=2", "method=rd"]]
    assert job_dir_names(jobs, ["seed", "method", "backbone"]) == ["rd_r18_seed=1", "rd_r18_seed=2"]


def test_job_folder_names_are_safe_and_unique() -> None:
    jobs = [["backbone.weights=/models/a.pth"], ["backbone.weights=/models-a.pth"]]
    names = job_dir_names(jobs, ["backbone.weights"])
    assert all("/" not in n for n in names) and len(set(names)) == 2
    assert all(n.startswith("weights=") and "models-a.pth-" in n for n in names)  # made unique by a hash
    jobs = [["method.optimizer.lr=0.1", "method.lr=0.2"], ["method.optimizer.lr=0.1", "method.lr=0.3"]]
    assert job_dir_names(jobs, ["method.optimizer.lr", "method.lr"]) == [
        "method.lr=0.2_method.optimizer.lr=0.1",
        "method.lr=0.3_method.optimizer.lr=0.1",
    ]
    long = [[f"x={'v' * 300}"]]
    (name,) = job_dir_names(long, ["x"])
    assert len(name) < 140


def test_override_values_read_back_unchanged() -> None:
    parser = OverridesParser.create()
    for value in ["bottle", "01", "1", "a b", "x,y", "it's", "/tmp/a b/c=d"]:
        written = override_value(value)
        parsed = parser.parse_override(f"k={written}")
        assert not parsed.is_sweep_override() and parsed.value() == value, (value, written)
    assert override_value("metal_nut") == "metal_nut"


def _sweeper(tmp_path: Path, hydra_overrides: list[str]) -> StudySweeper:
    sweeper = StudySweeper(max_batch_size=None, params=None)
    sweeper.config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}, "overrides": {"hydra": hydra_overrides}}}
    )
    return sweeper


def test_sweeper_pins_the_sweep_folder_and_names_job_folders(tmp_path: Path) -> None:
    parser = OverridesParser.create()
    sweeper = _sweeper(tmp_path, ["hydra.mode=MULTIRUN"])
    overrides = parser.parse_overrides(["backbone=r18,wrn", "data.category=a,b", "trainer.max_epochs=1"])
    (jobs,) = sweeper.split_arguments(overrides, None)
    assert len(jobs) == 4
    for job in jobs:
        hydra_part = [o for o in job if o.startswith("hydra.")]
        dir_value = parser.parse_override(hydra_part[0]).value()
        subdir_value = parser.parse_override(hydra_part[1]).value()
        assert hydra_part[0].startswith("hydra.sweep.dir=") and dir_value == str((tmp_path / "sweep").absolute())
        backbone = next(o for o in job if o.startswith("backbone=")).split("=")[1]
        assert subdir_value == f"{backbone}_${{oc.select:data.category,job}}"
    batches = sweeper.split_arguments(overrides, 3)
    assert [len(b) for b in batches] == [3, 1]


def test_sweeper_keeps_a_given_subdir_and_runs_identical_jobs_once(tmp_path: Path) -> None:
    parser = OverridesParser.create()
    sweeper = _sweeper(tmp_path, ["hydra.sweep.subdir=${hydra.job.num}"])
    (jobs,) = sweeper.split_arguments(parser.parse_overrides(["data.category=a,b,a"]), None)
    assert [j[0] for j in jobs] == ["data.category=a", "data.category=b"]
    assert all(not any(o.startswith("hydra.sweep.subdir=") for o in j) for j in jobs)


# ------------------------------------------------------------------ finished jobs


def test_config_differences() -> None:
    old = {"a": 1, "b": {"c": 2, "d": 3}, "paths": {"output_dir": "/x"}, "data": {"root": "/d1", "category": "k"}}
    new = {
        "a": 1,
        "b": {"c": 2, "d": 4},
        "paths": {"output_dir": "/y"},
        "data": {"root": "/d2", "category": "k"},
        "e": 5,
    }
    assert config_differences(old, new) == ["b.d", "e"]
    assert config_differences(old, old) == []


def _job_cfg(**overrides: object) -> object:
    cfg = OmegaConf.create(
        {"seed": 1, "trainer": {"max_epochs": 2}, "paths": {"output_dir": "/here"}, "skip_finished": True}
    )
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_finished_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _job_cfg()
    assert finished_results(cfg, tmp_path) is None  # nothing there yet
    results = {
        "metrics": {"image_auroc": 0.9},
        "config": OmegaConf.to_container(_job_cfg(**{"paths.output_dir": "/elsewhere"})),
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert finished_results(cfg, tmp_path) == results
    assert "skipped: finished results in" in capsys.readouterr().out
    assert finished_results(_job_cfg(skip_finished=False), tmp_path) is None
    with pytest.raises(KdadError, match=r"trainer.max_epochs: 2 -> 3.*skip_finished=false"):
        finished_results(_job_cfg(**{"trainer.max_epochs": 3}), tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    assert finished_results(cfg, tmp_path) is None


# ------------------------------------------------------------------ the SLURM path, locally


def _tiny_sweep(demo_root: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch_home"), WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kdad.cli.train",
            "-m",
            "experiment=demo",
            "hydra.sweeper.params=null",
            f"data.root={demo_root}",
            "data.category=weave,washer",
            "data.image_size=32",
            "backbone.weights=none",
            "trainer.max_epochs=1",
            "trainer.accelerator=cpu",
            "callbacks=none",
            "logger=none",
            f"paths.log_dir={tmp_path / 'out'}",
            "print_config=false",
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
def test_gpu_launcher_pins_each_worker_to_its_own_gpu(demo_root: Path, tmp_path: Path) -> None:
    """hydra/launcher=gpus with two "GPUs": two joblib worker processes, each claims one slot
    and sets CUDA_VISIBLE_DEVICES before CUDA starts (the jobs themselves train on the CPU)."""
    proc = _tiny_sweep(demo_root, tmp_path, "hydra/launcher=gpus", "hydra.launcher.gpus=[6,7]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "out" / "demo" / "multiruns").iterdir()
    pinned = {}
    for category in ("weave", "washer"):
        assert (sweep / category / "results.json").is_file()
        match = re.search(
            r"job (\d) runs on GPU (\d) \(CUDA_VISIBLE_DEVICES=(\d)\)", (sweep / category / "demo.log").read_text()
        )
        assert match is not None, category
        pinned[int(match.group(1))] = match.group(2)
        assert match.group(2) == match.group(3)
    assert pinned == {0: "6", 1: "7"}  # job k took slot k: both GPUs busy at once
    assert sorted(p.name for p in (sweep / ".gpu_slots").iterdir()) == ["0.lock", "1.lock"]


@pytest.mark.slow
def test_submitit_sweep_writes_one_sweep_folder_with_one_folder_per_job(demo_root: Path, tmp_path: Path) -> None:
    """hydra/launcher=slurm_local: submitit runs each job in its own process (as SLURM array
    tasks would); both must land in the same sweep folder, each in its own job folder."""
    out = tmp_path / "out"
    proc = _tiny_sweep(demo_root, tmp_path, "hydra/launcher=slurm_local")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (out / "demo" / "multiruns").iterdir()
    found = sorted(sweep.rglob("results.json"))
    assert [p.parent.name for p in found] == ["washer", "weave"]
    assert all(p.parent.parent == sweep for p in found)
    assert sorted(json.loads(p.read_text())["category"] for p in found) == ["washer", "weave"]
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    pids = {p.name.split("_")[0] for p in logs}
    assert len(logs) == 2 and len(pids) == 2, logs  # two separate job processes
