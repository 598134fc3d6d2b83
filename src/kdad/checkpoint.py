"""Loading kdad checkpoints safely: no code from the file ever runs.

A checkpoint is read with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler
accepts tensors and plain containers only, so a file whose pickle would call a function
(``__reduce__``) is refused before anything runs, also when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
is set (it only applies when ``weights_only`` is not passed). The method is then rebuilt from the
recorded name and hyper-parameters (plain JSON types) and the weights are loaded into it.

Compatibility is decided by ``checkpoint["kdad"]["format"]`` (:data:`kdad.methods.base.CHECKPOINT_FORMAT`),
not by the kdad version, which is only named in messages. Every failure is a one-line
:class:`~kdad.errors.KdadError`.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdad.errors import KdadError


def _damaged_zip_member(path: Path) -> str | None:
    """The first member of a zip-format checkpoint whose CRC32 does not match, else ``None``.

    torch.load does not verify the zip's checksums: a flipped byte inside tensor data would load
    silently with wrong weights. Unreadable zips are left to torch.load's own error."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, loaded with ``weights_only=True``; one-line errors otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdadError(f"checkpoint {path} does not exist; pass ckpt=<path to a .ckpt written by kdad-train>")
    damaged = _damaged_zip_member(path)
    if damaged is not None:
        raise KdadError(f"checkpoint {path} is corrupted ({damaged} fails its CRC check); copy or train it again")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated file, pickle with code, not a torch file: any failure is a one-line error
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise KdadError(
            f"checkpoint {path} could not be read safely ({reason}); is it a complete kdad checkpoint?"
        ) from None
    if (
        not isinstance(checkpoint, dict)
        or not isinstance(checkpoint.get("kdad"), dict)
        or "state_dict" not in checkpoint
    ):
        raise KdadError(
            f"checkpoint {path} was not written by kdad-train (no 'kdad' metadata); train with kdad-train first"
        )
    return checkpoint


def load_model(path: str | Path, expected_method: str | None = None) -> tuple[Any, dict[str, Any]]:
    """Rebuild the method recorded in a kdad checkpoint and load its weights (eval mode).

    Frozen backbones are restored from the checkpoint itself, so no weights are downloaded.
    ``expected_method`` (e.g. ``"rd"``): refuse a checkpoint of another method. Returns
    ``(model, metadata)``.
    """
    from kdad.methods import METHODS
    from kdad.methods.base import CHECKPOINT_FORMAT

    checkpoint = read_checkpoint(path)
    meta = checkpoint["kdad"]
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise KdadError(
            f"checkpoint {path} has kdad checkpoint format {meta.get('format')} (kdad {meta.get('version')}); "
            f"this kdad reads format {CHECKPOINT_FORMAT}: evaluate it with the kdad version that wrote it"
        )
    name = meta.get("method")
    if name not in METHODS:
        raise KdadError(
            f"checkpoint {path} holds method '{name}', unknown to this kdad (known: {', '.join(sorted(METHODS))})"
        )
    if expected_method is not None and name != expected_method:
        raise KdadError(
            f"checkpoint {path} holds a '{name}' model, not the requested '{expected_method}'; "
            f"pass a {expected_method} checkpoint"
        )
    hparams = meta.get("hparams") or {}
    if not isinstance(hparams, Mapping):
        raise KdadError(
            f"checkpoint {path} has unreadable hyper-parameters ({type(hparams).__name__}); "
            "it was written by an incompatible kdad version"
        )
    hparams = {**hparams, "weights": "none"}  # the frozen weights come from the state dict below
    try:
        model = METHODS[name](**hparams)
    except TypeError as error:  # an argument this kdad's method does not take (or lacks)
        raise KdadError(
            f"checkpoint {path} records '{name}' options this kdad cannot rebuild "
            f"({str(error).splitlines()[0][:160]}); "
            f"it was written by kdad {meta.get('version')}: use that version"
        ) from None
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise KdadError(
            f"checkpoint {path} does not fit method '{name}' (missing {len(missing)} keys, e.g. {missing[:2]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:2]}); it was written by an incompatible kdad version"
        )
    model.eval()
    # normal-data thresholds (kdad.callbacks.NormalThresholds); None when none were stored
    model.normal_thresholds = meta.get("thresholds")
    return model, meta


def recorded_image_size(meta: Mapping[str, Any], path: str | Path, image_size: Any = None) -> tuple[int, int]:
    """The model's input ``(H, W)``: ``image_size`` when given, else the ``data.image_size``
    recorded in the checkpoint metadata ``meta`` (read from ``path``)."""
    from kdad.data.dataset import as_size

    size = image_size if image_size is not None else (meta.get("datamodule") or {}).get("image_size")
    if size is None:
        raise KdadError(f"checkpoint {path} records no input size; pass image_size=<pixels or [height, width]>")
    return as_size(size)
