"""Hydra glue: where the configs live, kdad's resolvers, and instantiation helpers."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

_PROCESS_UID = uuid.uuid4().hex[:6]


def config_dir() -> str:
    """The ``conf/`` folder: ``$KDAD_CONFIG_DIR``, else the repository's ``conf/`` (editable
    install), else the copy packaged as ``kdad/conf`` (wheel install)."""
    env = os.environ.get("KDAD_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parents[1] / "conf", here / "conf"]
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kdad's config folder was not found (looked in {', '.join(map(str, candidates))})")


def _demo_categories() -> list[str]:
    from kdad.data import DEMO_CATEGORIES

    return list(DEMO_CATEGORIES)


def register_resolvers() -> None:
    """``${kdad_uid:}``: a random id fixed per process (output folders never collide);
    ``${kdad_demo_categories:}``: the demo set's categories."""
    if not OmegaConf.has_resolver("kdad_uid"):
        OmegaConf.register_new_resolver("kdad_uid", lambda: _PROCESS_UID)
    if not OmegaConf.has_resolver("kdad_demo_categories"):
        OmegaConf.register_new_resolver("kdad_demo_categories", _demo_categories)


# Keys of a data config that describe the dataset for sweeps/reports but are not arguments.
DATA_METADATA_KEYS = ("categories",)


def instantiate_datamodule(data_cfg: DictConfig, **overrides: Any) -> Any:
    """Instantiate the data group's datamodule (metadata keys such as ``categories`` removed)."""
    container = OmegaConf.to_container(data_cfg, resolve=True)
    assert isinstance(container, dict)
    for key in DATA_METADATA_KEYS:
        container.pop(key, None)
    container.update(overrides)
    return hydra.utils.instantiate(container, _convert_="all")


def apply_runtime_settings(cfg: DictConfig) -> None:
    """Process-wide settings from the top-level config.

    ``flush_denormal`` (default true): flush denormal floats to zero on the CPU. Randomly
    initialised or BN-recalibrated networks can produce denormals, which made CPU training
    twice as slow here; values below ~1e-38 do not change any result we report.
    """
    import warnings

    import torch

    if cfg.get("flush_denormal", True):
        torch.set_flush_denormal(True)
    # frozen teachers are in eval mode on purpose (AnomalyModule.freeze); the warning misleads
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger / litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party_notices() -> None:
    """What kdad's entry points silence in their own process: Lightning's tips to install its
    cloud products (litlogger, litmodels) and the deprecation warning Lightning's own pytree
    helper triggers in torch (``isinstance(treespec, LeafSpec)``), which no kdad user can act
    on. Users' code that imports kdad as a library keeps every warning."""
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


def instantiate_collection(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a callbacks/logger group (empty when null)."""
    if not cfg:
        return []
    # list(): every entry is resolved (a missing one fails) before any is instantiated, as items() did
    entries = list(cfg.values())
    return [
        hydra.utils.instantiate(entry, _convert_="all")
        for entry in entries
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def print_config_tree(
    cfg: DictConfig, keys: tuple[str, ...] = ("data", "method", "backbone", "trainer", "logger", "callbacks", "paths")
) -> None:
    """Print the composed config as a rich tree (one branch per group)."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key in keys + tuple(k for k in cfg if k not in keys and k != "hydra"):
        if key not in cfg:
            continue
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(key).add(Syntax(text, "yaml"))
    rich_print(tree)
