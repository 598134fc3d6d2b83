"""Loading kdad checkpoints safely (``weights_only``: no code runs while loading)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdad.errors import KdadError


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's dict, loaded with ``weights_only=True``; one-line errors otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KdadError(f"checkpoint {path} does not exist; pass ckpt=<path to a .ckpt written by kdad-train>")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, pickle with code, not a torch file
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise KdadError(f"checkpoint {path} could not be read safely ({reason}); is it a complete kdad checkpoint?") from None
    if not isinstance(checkpoint, dict) or "kdad" not in checkpoint or "state_dict" not in checkpoint:
        raise KdadError(f"checkpoint {path} was not written by kdad-train (no 'kdad' metadata); train with kdad-train first")
    return checkpoint


def load_model(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """Rebuild the method recorded in a kdad checkpoint and load its weights (eval mode).

    Frozen backbones are restored from the checkpoint itself, so no weights are downloaded.
    Returns ``(model, metadata)``.
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
        raise KdadError(f"checkpoint {path} holds method '{name}', unknown to this kdad (known: {', '.join(sorted(METHODS))})")
    hparams = dict(meta.get("hparams") or {})
    hparams["weights"] = "none"  # the frozen weights come from the state dict below
    model = METHODS[name](**hparams)
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise KdadError(
            f"checkpoint {path} does not fit method '{name}' (missing {len(missing)} keys, e.g. {missing[:2]}; "
            f"unexpected {len(unexpected)}, e.g. {unexpected[:2]}); it was written by an incompatible kdad version"
        )
    model.eval()
    return model, meta
