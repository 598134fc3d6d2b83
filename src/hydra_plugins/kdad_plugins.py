"""kdad's Hydra plugins. Hydra instantiates sweepers and launchers only from the
``hydra_plugins`` package; the code lives in :mod:`kdad.launch`."""

import kdad.launch as _launch


class StudySweeper(_launch.StudySweeper):
    """Basic sweeper + ``data.category=all``, pinned sweep folder, named job folders."""


class GpuSlotLauncher(_launch.GpuSlotLauncher):
    """``hydra/launcher=gpus``: joblib, one worker per GPU, each pinned to its GPU."""
