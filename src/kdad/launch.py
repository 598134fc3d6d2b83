"""Sweeps and launchers (issue 3): skipping finished jobs, launch-safety checks, study job
folders, ``data.category=all``, and one-GPU-per-job slots on a many-GPU node.

Hydra only instantiates sweeper/launcher plugins that live in the ``hydra_plugins`` package, so
the classes here are exposed to Hydra by thin subclasses in ``hydra_plugins/kdad_plugins.py``:

* :class:`StudySweeper`: Hydra's basic sweeper, plus ``data.category=all`` (every category of
  the job's dataset), one pinned sweep folder for every job (whatever process runs it) and job
  folders named after the swept values (deterministic: a re-run finds its finished jobs).
* :class:`GpuSlotLauncher`: Hydra's joblib launcher with each worker process pinned to one GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, RunMode, TaskFunction
from omegaconf import DictConfig, OmegaConf

from kdad.config import register_resolvers
from kdad.errors import KdadError

log = logging.getLogger("kdad")

# Jobs may run in fresh processes (submitit, joblib) that unpickle the task function without
# importing the CLI module. Hydra hands its resolvers to them; this is the safety net.
register_resolvers()

# --------------------------------------------------------------------------------------------
# Finished jobs (resumable sweeps)
# --------------------------------------------------------------------------------------------

#: Config keys that do not change what a job computes: a finished job whose config differs
#: from the current one only here counts as the same job.
IDENTITY_IGNORED_KEYS = (
    "paths",
    "task_name",
    "print_config",
    "skip_finished",
    "logger",
    "callbacks",
    "tags",
    "ckpt_path",
    "resume",
    "stop_signals",
    "data.root",
    "data.num_workers",
    "trainer.default_root_dir",
    "trainer.enable_progress_bar",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def _ignored(key: str, ignored: Sequence[str]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in ignored)


def config_differences(
    previous: Mapping[str, Any], current: Mapping[str, Any], ignored: Sequence[str] = IDENTITY_IGNORED_KEYS
) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (``ignored`` keys aside)."""
    old, new = _flatten(previous), _flatten(current)
    keys = sorted(k for k in set(old) | set(new) if not _ignored(k, ignored))
    return [k for k in keys if old.get(k, "<missing>") != new.get(k, "<missing>")]


def describe_differences(
    previous: Mapping[str, Any], current: Mapping[str, Any], differences: Sequence[str], shown: int = 3
) -> str:
    """``key: old -> new`` for the first ``shown`` of ``differences`` (:func:`config_differences`)."""
    old, new = _flatten(previous), _flatten(current)
    text = ", ".join(f"{k}: {old.get(k, '<missing>')!r} -> {new.get(k, '<missing>')!r}" for k in differences[:shown])
    return text + (f" and {len(differences) - shown} more" if len(differences) > shown else "")


def finished_results(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """The results of an already finished job this run would repeat, or None (run it).

    A job is finished when its output folder holds a readable ``results.json`` (results are
    written atomically, so a killed run leaves none; an unreadable one is reported and the job
    runs again; a ``failed.json`` is not finished either). Sweep job folders are
    named after what the job runs (:class:`StudySweeper`), so re-running a sweep into the same
    ``hydra.sweep.dir`` lands every job in its previous folder. ``skip_finished=false`` retrains
    (and overwrites). A folder whose results came from another config (other than paths,
    loggers, callbacks: :data:`IDENTITY_IGNORED_KEYS`) is an error, never silently overwritten.
    """
    if not cfg.get("skip_finished", True):
        return None
    path = Path(output_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        previous = f"{type(error).__name__}: {error}"
    if not isinstance(previous, dict):
        log.warning(
            "%s is unreadable (%s): training again",
            path,
            previous if isinstance(previous, str) else "not a JSON object",
        )
        return None
    previous_config = previous.get("config")
    if isinstance(previous_config, Mapping):
        current = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(current, dict)
        differences = config_differences(previous_config, current)
        if differences:
            raise KdadError(
                f"{path} holds a finished run of another config "
                f"({describe_differences(previous_config, current, differences)}): "
                "start a new study (another hydra.sweep.dir) or pass skip_finished=false to retrain and overwrite it"
            )
    message = f"skipped: finished results in {path} (skip_finished=false trains again)"
    log.info(message)
    print(message, flush=True)
    return previous


# --------------------------------------------------------------------------------------------
# Launch-safety checks
# --------------------------------------------------------------------------------------------


def _device_count(devices: Any) -> int | None:
    """How many devices a Lightning ``devices`` value asks for (None: "auto"/-1, unknown)."""
    if isinstance(devices, bool):
        return None
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        if text.lstrip("-").isdigit():
            return _device_count(int(text))
    return None


def launch_problem(mode: RunMode | str | None, trainer: Mapping[str, Any], env: Mapping[str, str]) -> str | None:
    """Why this launch combination is unsafe, or None when it is fine.

    Lightning's DDP starts the extra processes itself by re-running the command line, which
    breaks inside a Hydra multirun (each re-run would start a sweep of its own). In a multirun
    every job must therefore be one process on one device, unless SLURM already started one task
    per device (``SLURM_NTASKS`` = devices x nodes; ``devices=auto``/``-1`` count the job's
    ``SLURM_GPUS_ON_NODE``); then Lightning only joins them.
    """
    mode_name = mode.name if isinstance(mode, RunMode) else str(mode or "").upper()
    if mode_name != "MULTIRUN":
        return None
    strategy = str(trainer.get("strategy", "auto") or "auto").lower()
    devices = trainer.get("devices", "auto")
    count = _device_count(devices)
    if count == 1 and "ddp" not in strategy:
        return None
    nodes = int(trainer.get("num_nodes", 1) or 1)
    tasks = str(env.get("SLURM_NTASKS", "")).strip()
    if count is None and str(env.get("SLURM_GPUS_ON_NODE", "")).strip().isdigit():
        count = int(env["SLURM_GPUS_ON_NODE"])  # devices=auto/-1 under SLURM: the job's GPUs on this node
    if count is not None and tasks.isdigit() and int(tasks) == count * nodes:
        return None
    return (
        f"trainer.devices={devices} trainer.strategy={strategy} starts several processes, which breaks "
        "inside a Hydra multirun (-m): use one-GPU jobs in sweeps (trainer.devices=1; hydra/launcher=gpus "
        "runs one per GPU), or hydra/launcher=slurm with hydra.launcher.tasks_per_node = "
        "hydra.launcher.gpus_per_node = trainer.devices"
    )


def check_launch(cfg: DictConfig) -> None:
    """Refuse launch combinations known to break: DDP re-launch inside a Hydra multirun
    (:func:`launch_problem`), ``data.category=all`` outside a sweep."""
    mode = HydraConfig.get().mode if HydraConfig.initialized() else None
    problem = launch_problem(mode, cfg.get("trainer") or {}, os.environ)
    if problem:
        raise KdadError(problem)
    if OmegaConf.select(cfg, "data.category", default=None) == ALL:
        raise KdadError("data.category=all expands to every category only in a sweep: add -m (kdad-train -m ...)")


# --------------------------------------------------------------------------------------------
# Study sweeps: data.category=all, pinned sweep folder, job folders named by swept values
# --------------------------------------------------------------------------------------------

ALL = "all"
CATEGORY_KEY = "data.category"
#: swept keys shown by value only, in this order; any other swept key shows as ``name=value``
NAME_KEYS = ("method", "backbone", "data")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
MAX_NAME = 120


def quote_override_value(value: str) -> str:
    """A string as a quoted Hydra override value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_value(value: str) -> str:
    """``value`` as written in an override: bare when Hydra reads it back as that same string
    (``bottle``, ``01``), else quoted (``'a b'``, ``'1'``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_override(f"k={value}")
    except Exception:  # noqa: BLE001 - anything Hydra cannot read bare gets quoted
        return quote_override_value(value)
    if not parsed.is_sweep_override() and isinstance(parsed.value(), str) and parsed.value() == value:
        return value
    return quote_override_value(value)


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return key, value


def _short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def job_dir_names(jobs: Sequence[Sequence[str]], swept: Sequence[str]) -> list[str]:
    """A folder-name prefix per job from the values of its swept keys (``data.category``
    excepted: the job appends its own category). Deterministic: it depends on the job's
    overrides and on which keys are swept, not on job numbers. Names that would collide
    after making them file-system safe get a short hash of the job's overrides."""
    keys = [k for k in NAME_KEYS if k in swept] + sorted(
        k for k in set(swept) if k not in NAME_KEYS and k != CATEGORY_KEY
    )
    short = {k: k.rsplit(".", 1)[-1].lstrip("+~") for k in keys}
    label = {k: (short[k] if list(short.values()).count(short[k]) == 1 else k.lstrip("+~")) for k in keys}
    names = []
    for job in jobs:
        values = dict(_split(o) for o in job)
        parts = [values.get(k, "") if k in NAME_KEYS else f"{label[k]}={values.get(k, '')}" for k in keys]
        name = _UNSAFE.sub("-", "_".join(parts)).strip("-")
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME]}-{_short_hash(' '.join(sorted(job)))}"
        names.append(name)
    categories = [dict(_split(o) for o in job).get(CATEGORY_KEY, "") for job in jobs]
    full = [f"{n}_{c}" for n, c in zip(names, categories)]
    for i, job in enumerate(jobs):
        if full.count(full[i]) > 1:
            names[i] = f"{names[i]}-{_short_hash(' '.join(sorted(job)))}".lstrip("-")
    return names


class StudySweeper(BasicSweeper):
    """Hydra's basic sweeper (cartesian product of ``a=1,2 b=x,y``) with three additions:

    * ``data.category=all`` (on the command line or in ``hydra.sweeper.params``) becomes one job
      per entry of the job's ``data.categories`` (so ``data=mpdd,btad data.category=all`` works);
    * every job gets the sweep folder resolved once, here: jobs in other processes (submitit,
      SLURM array tasks, joblib workers) cannot resolve ``${now:}``/``${kdad_uid:}`` anew;
    * every job folder is named after its swept values plus its category, e.g.
      ``resnet18_bottle`` for ``backbone=resnet18,wide_resnet50_2 data.category=all``,
      unless ``hydra.sweep.subdir`` is given on the command line. Identical jobs run once.
    """

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        # BasicSweeper.__init__ calls super(BasicSweeper, self), which fails here: Hydra's plugin
        # scan re-executes its module, so the name BasicSweeper then means another class object.
        Sweeper.__init__(self)
        self.overrides = None
        self.batch_index = 0
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.hydra_context = None
        self.config = None
        self.launcher = None

    def split_arguments(self, overrides: list[Override], max_batch_size: int | None) -> list[list[list[str]]]:  # type: ignore[override]
        (jobs,) = BasicSweeper.split_arguments(overrides, None)
        swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
        expanded: list[list[str]] = []
        for job in jobs:
            more = self._expand_all_categories(job)
            if len(more) > 1:
                swept.add(CATEGORY_KEY)
            expanded.extend(more)
        unique = list({tuple(job): list(job) for job in expanded}.values())
        if len(unique) < len(expanded):
            log.warning("%d identical jobs in the sweep run once", len(expanded) - len(unique))
        final = [
            job + self._job_hydra_overrides(job, name)
            for job, name in zip(unique, job_dir_names(unique, sorted(swept)))
        ]
        size = len(final) if not max_batch_size or max_batch_size < 0 else max_batch_size
        return [final[i : i + size] for i in range(0, len(final), size)]

    def _expand_all_categories(self, job: list[str]) -> list[list[str]]:
        index = next((i for i, o in enumerate(job) if o == f"{CATEGORY_KEY}={ALL}"), None)
        if index is None:
            return [job]
        assert self.hydra_context is not None and self.config is not None
        rest = job[:index] + job[index + 1 :]
        job_cfg = self.hydra_context.config_loader.load_sweep_config(self.config, rest)
        categories = OmegaConf.select(job_cfg, "data.categories", default=None)
        if not categories:
            raise KdadError(
                "data.category=all needs the dataset's category list data.categories (set data.categories=[...])"
            )
        return [[*job[:index], f"{CATEGORY_KEY}={override_value(str(c))}", *job[index + 1 :]] for c in categories]

    def _job_hydra_overrides(self, job: list[str], name: str) -> list[str]:
        assert self.config is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        extra = [f"hydra.sweep.dir={quote_override_value(str(sweep_dir))}"]
        given = [str(o) for o in OmegaConf.to_container(self.config.hydra.overrides.hydra, resolve=False)]  # type: ignore[union-attr]
        if not any(o.startswith("hydra.sweep.subdir=") for o in given):
            category = "${oc.select:data.category,job}"
            extra.append(f"hydra.sweep.subdir={quote_override_value(f'{name}_{category}' if name else category)}")
        return extra


# --------------------------------------------------------------------------------------------
# One node, many GPUs: one job per GPU
# --------------------------------------------------------------------------------------------


def visible_gpus(env: Mapping[str, str], device_count: int = 0) -> list[str]:
    """The GPU ids jobs may use: the ``CUDA_VISIBLE_DEVICES`` list when set (``"4,5,6,7"``;
    empty: none), else ``0 .. device_count-1``."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return [str(i) for i in range(device_count)]
    return [part.strip() for part in value.split(",") if part.strip()]


def choose_gpus(option: Any, env: Mapping[str, str], device_count: int) -> list[str]:
    """``hydra.launcher.gpus``: null (every visible GPU), a count N (the first N visible), or a
    list/comma string of GPU ids (as the node names them, not renumbered)."""
    visible = visible_gpus(env, device_count)
    if option is None:
        return visible
    if isinstance(option, int) and not isinstance(option, bool):
        if option < 1 or option > len(visible):
            raise KdadError(
                f"hydra.launcher.gpus={option} but {len(visible)} GPU(s) are visible: "
                f"use a count between 1 and {len(visible)}"
            )
        return visible[:option]
    items = option.split(",") if isinstance(option, str) else list(option)
    gpus = [str(g).strip() for g in items if str(g).strip()]
    if len(set(gpus)) != len(gpus):
        raise KdadError(f"hydra.launcher.gpus={option} lists a GPU twice: list each GPU once")
    return gpus


def preferred_slot(job_num: int, n_slots: int) -> int:
    """The slot a job tries first: ``job_num % n_slots`` (the first N jobs take N slots)."""
    if n_slots < 1:
        raise ValueError("n_slots must be >= 1")
    return job_num % n_slots


def claim_gpu_slot(
    lock_dir: Path, n_slots: int, preferred: int, poll_s: float = 2.0, timeout_s: float | None = None
) -> tuple[int, IO[str]]:
    """Claim a free slot with an exclusive ``flock`` on ``lock_dir/<slot>.lock``: the preferred
    one if free, else the next free one; wait while all are taken. The lock lives as long as the
    returned handle (the OS releases it when the process ends, however it ends). POSIX only."""
    import fcntl

    lock_dir.mkdir(parents=True, exist_ok=True)
    order = [(preferred + i) % n_slots for i in range(n_slots)]
    start = time.monotonic()
    while True:
        for slot in order:
            handle = open(lock_dir / f"{slot}.lock", "a+")  # noqa: SIM115 - the lock lives with the handle
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            return slot, handle
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(f"no free GPU slot in {lock_dir} after {timeout_s} s")
        time.sleep(poll_s)


#: this process's GPU slot: (slot, GPU id, lock handle); a worker keeps its GPU for all its jobs
_PROCESS_GPU: tuple[int, str, IO[str]] | None = None


def pin_process_to_gpu(gpus: Sequence[str], lock_dir: Path, job_num: int, env: dict[str, str] | None = None) -> str:
    """Give this process one GPU of ``gpus`` for good: claim a slot (:func:`claim_gpu_slot`,
    trying ``job_num % len(gpus)`` first) and set ``CUDA_VISIBLE_DEVICES`` to that GPU, before
    CUDA starts. Later calls in the same process return the same GPU. Returns the GPU id."""
    global _PROCESS_GPU
    if _PROCESS_GPU is None:
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError("CUDA started before the job was pinned to a GPU")
        slot, handle = claim_gpu_slot(lock_dir, len(gpus), preferred_slot(job_num, len(gpus)))
        _PROCESS_GPU = (slot, gpus[slot], handle)
    target = os.environ if env is None else env
    target["CUDA_VISIBLE_DEVICES"] = _PROCESS_GPU[1]
    return _PROCESS_GPU[1]


class GpuSlotTask:
    """The Hydra task wrapped so that it first pins its process to one GPU."""

    def __init__(self, task_function: Callable[[DictConfig], Any], gpus: Sequence[str], lock_dir: str) -> None:
        self.task_function = task_function
        self.gpus = list(gpus)
        self.lock_dir = lock_dir

    def __call__(self, cfg: DictConfig) -> Any:
        job_num = int(HydraConfig.get().job.num) if HydraConfig.initialized() else 0
        gpu = pin_process_to_gpu(self.gpus, Path(self.lock_dir), job_num)
        log.info("job %d runs on GPU %s (CUDA_VISIBLE_DEVICES=%s)", job_num, gpu, gpu)
        return self.task_function(cfg)


class GpuSlotLauncher(Launcher):
    """Hydra's joblib launcher, one worker process per GPU, each worker pinned to its own GPU
    for all the jobs it runs (``hydra/launcher=gpus``). ``gpus``: see :func:`choose_gpus`;
    the other keys are ``joblib.Parallel``'s (``n_jobs`` defaults to the number of GPUs).
    Needs ``hydra-joblib-launcher``."""

    def __init__(self, gpus: Any = None, **joblib_kwargs: Any) -> None:
        self.gpus_option = OmegaConf.to_container(gpus) if OmegaConf.is_config(gpus) else gpus
        self.joblib_kwargs = dict(joblib_kwargs)
        self.inner: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        try:
            from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
        except ImportError:
            raise KdadError(
                "hydra/launcher=gpus needs hydra-joblib-launcher: pip install hydra-joblib-launcher"
            ) from None
        count = 0
        if os.environ.get("CUDA_VISIBLE_DEVICES") is None and self.gpus_option is None:
            import torch

            count = torch.cuda.device_count()
        gpus = choose_gpus(self.gpus_option, os.environ, count)
        if not gpus:
            raise KdadError(
                "hydra/launcher=gpus found no GPU: set hydra.launcher.gpus=[0,1,...] or CUDA_VISIBLE_DEVICES"
            )
        kwargs = dict(self.joblib_kwargs)
        if kwargs.get("n_jobs") in (None, -1):
            kwargs["n_jobs"] = len(gpus)
        lock_dir = Path(str(config.hydra.sweep.dir)).absolute() / ".gpu_slots"
        log.info("hydra/launcher=gpus: %d parallel jobs on GPUs %s", kwargs["n_jobs"], ",".join(gpus))
        self.inner = JoblibLauncher(**kwargs)
        self.inner.setup(
            hydra_context=hydra_context, task_function=GpuSlotTask(task_function, gpus, str(lock_dir)), config=config
        )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.inner is not None, "setup() first"
        return self.inner.launch(job_overrides, initial_job_idx)
