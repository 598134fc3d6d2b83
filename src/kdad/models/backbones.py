"""Feature-extracting backbones with explicit weight provenance.

``build_backbone(name, weights, layers)`` returns a :class:`FeatureExtractor` whose
``forward(x)`` is a list with one feature map per requested layer, in the requested order.

Names
    * torchvision ResNets: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101``, ``resnet152``,
      ``wide_resnet50_2``, ``wide_resnet101_2``, ``resnext50_32x4d``, ``resnext101_32x8d``.
      ``weights="imagenet"`` always means torchvision's ``IMAGENET1K_V1`` weights (the ones the
      RD/URD code loads, e.g. ``wide_resnet50_2-95faca4d.pth``), never ``V2``/``DEFAULT``.
    * any timm model with a ``timm:`` prefix, e.g. ``timm:resnet18.a1_in1k``. The pretrained tag
      is part of the name, so ``weights="imagenet"`` loads exactly that tag.

Weights
    * ``"imagenet"``: the named ImageNet weights (torch hub cache / Hugging Face cache; a failed
      download raises :class:`~kdad.errors.KdadError` that says how to proceed offline).
    * ``"none"``: random init (the library's own init).
    * a path: a local state dict. For torchvision, the file may hold the full model (as
      torchvision ships it) or only the kept parts (stem + layers); keys are checked strictly.

Only the stem and the layers up to the deepest requested one are kept: a ``layer1..layer3``
extractor holds no ``layer4`` and no ``fc`` and never computes them. Module names are the
torchvision ones (``conv1``, ``bn1``, ``layer1`` ...), so the extractor's own state dict uses
the same keys as torchvision's.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from kdad.errors import KdadError

__all__ = [
    "TORCHVISION_RESNETS",
    "FeatureExtractor",
    "build_backbone",
    "build_backbone_with_fallback",
    "imagenet_weights_available",
    "torchvision_weights_url",
]

#: torchvision ResNet-family names supported directly (all have IMAGENET1K_V1 weights).
TORCHVISION_RESNETS: tuple[str, ...] = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
    "resnext50_32x4d",
    "resnext101_32x8d",
)
_RESNET_LAYERS: tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
_RESNET_REDUCTIONS: dict[str, int] = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_STEM: tuple[str, ...] = ("conv1", "bn1", "relu", "maxpool")
_NETWORK_ERRORS = (urllib.error.URLError, OSError, RuntimeError)


class FeatureExtractor(nn.Module):
    """Base class: ``forward(x) -> list[Tensor]``, one map per requested layer.

    Attributes:
        name: the backbone name as given to :func:`build_backbone`.
        layers: the requested layer names, in output order.
        channels: channels of each output.
        reductions: stride of each output w.r.t. the input (4/8/16 for ResNet layer1..3).
        weights_source: where the weights came from, e.g.
            ``"torchvision:Wide_ResNet50_2_Weights.IMAGENET1K_V1"``, ``"none (random init)"``,
            ``"file:/abs/path.pth"``.
    """

    name: str
    layers: list[str]
    channels: list[int]
    reductions: list[int]
    weights_source: str

    def forward(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


class TorchvisionResNetFeatures(FeatureExtractor):
    """Stem + ``layer1..layerK`` of a torchvision ResNet, with torchvision's module names."""

    def __init__(self, full_model: nn.Module, name: str, layers: Sequence[str], weights_source: str):
        super().__init__()
        self.name = name
        self.layers = list(layers)
        self.weights_source = weights_source
        last = max(_RESNET_LAYERS.index(layer) for layer in self.layers)
        self._kept_layers = list(_RESNET_LAYERS[: last + 1])
        for part in (*_STEM, *self._kept_layers):  # same names as torchvision -> same keys
            self.add_module(part, getattr(full_model, part))
        self.channels = [_stage_out_channels(getattr(self, layer)) for layer in self.layers]
        self.reductions = [_RESNET_REDUCTIONS[layer] for layer in self.layers]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B,64,H/4,W/4]
        out: dict[str, Tensor] = {}
        for layer in self._kept_layers:
            x = getattr(self, layer)(x)
            out[layer] = x
        return [out[layer] for layer in self.layers]


class TimmFeatures(FeatureExtractor):
    """A timm ``features_only`` model (timm prunes everything after the last requested stage)."""

    def __init__(self, body: nn.Module, name: str, layers: Sequence[str], weights_source: str):
        super().__init__()
        self.body = body
        self.name = name
        self.layers = list(layers)
        self.weights_source = weights_source
        info = body.feature_info  # type: ignore[attr-defined]
        self.channels = [int(c) for c in info.channels()]
        self.reductions = [int(r) for r in info.reduction()]

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.body(x))


def _stage_out_channels(stage: nn.Module) -> int:
    last_block = list(stage.children())[-1]
    last_conv = last_block.conv3 if hasattr(last_block, "conv3") else last_block.conv2
    return int(last_conv.out_channels)


# ----------------------------------------------------------------------------------------------
# torchvision weights
# ----------------------------------------------------------------------------------------------


def _torchvision_v1_weights(name: str) -> torchvision.models.WeightsEnum:
    enum = torchvision.models.get_model_weights(name)
    return enum["IMAGENET1K_V1"]  # explicit: never DEFAULT / V2


def torchvision_weights_url(name: str) -> str:
    """URL of torchvision's ``IMAGENET1K_V1`` weights for ``name``."""
    _check_torchvision_name(name)
    return str(_torchvision_v1_weights(name).url)


def _hub_cache_file(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def imagenet_weights_available(name: str) -> bool:
    """True if the ImageNet V1 weights of a torchvision backbone are already in the torch hub
    cache (``$TORCH_HOME/hub/checkpoints``), so that ``weights="imagenet"`` works offline.
    Never touches the network. For ``timm:`` names this returns False (the Hugging Face cache is
    not inspected)."""
    if name not in TORCHVISION_RESNETS:
        return False
    return _hub_cache_file(torchvision_weights_url(name)).is_file()


def _download_hint(name: str) -> str:
    if name in TORCHVISION_RESNETS:
        file_name = os.path.basename(torchvision_weights_url(name))
    else:
        file_name = "state_dict.pth"
    return (
        f"pass a local file with backbone.weights=/path/to/{file_name} "
        "or train from random init with backbone.weights=none"
    )


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:160]}"


def _load_imagenet_state_dict(name: str) -> dict[str, Tensor]:
    url = torchvision_weights_url(name)
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except _NETWORK_ERRORS as exc:
        raise KdadError(f"could not get ImageNet weights for {name} ({_short(exc)}); {_download_hint(name)}") from exc


def _load_local_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], Path]:
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise KdadError(
            f"backbone weights file not found: {file}; pass an existing state-dict file with "
            "backbone.weights=/path/to/file.pth, backbone.weights=imagenet or backbone.weights=none"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise KdadError(f"could not read backbone weights {file} ({_short(exc)})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise KdadError(f"backbone weights {file} do not hold a state dict (got {type(state).__name__})")
    return state, file


def _key_diff(model: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Missing/unexpected keys, ignoring BN ``num_batches_tracked`` (absent in old files)."""

    def relevant(keys: set[str]) -> set[str]:
        return {k for k in keys if not k.endswith("num_batches_tracked")}

    expected = relevant(set(model.state_dict()))
    given = relevant(set(state))
    return sorted(expected - given), sorted(given - expected)


def _fmt_keys(keys: list[str], limit: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_torchvision_name(name: str) -> None:
    if name not in TORCHVISION_RESNETS:
        raise KdadError(
            f"unknown backbone '{name}'; use one of {', '.join(TORCHVISION_RESNETS)} "
            "or a timm model as 'timm:<model_name>.<pretrained_tag>'"
        )


def _check_resnet_layers(name: str, layers: Sequence[str]) -> list[str]:
    layers = list(layers)
    bad = [layer for layer in layers if layer not in _RESNET_LAYERS]
    if not layers or bad or len(set(layers)) != len(layers):
        raise KdadError(
            f"backbone.layers={layers} is invalid for {name}; use distinct names out of "
            f"{list(_RESNET_LAYERS)}, e.g. [layer1, layer2, layer3]"
        )
    return layers


def _build_torchvision(name: str, weights: str, layers: Sequence[str]) -> FeatureExtractor:
    _check_torchvision_name(name)
    layers = _check_resnet_layers(name, layers)
    # Build the full torchvision model (torchvision's own random init), load the full state dict
    # into it, then keep only the stem and the needed stages.
    if weights == "none":
        full = torchvision.models.get_model(name, weights=None)
        return TorchvisionResNetFeatures(full, name, layers, "none (random init)")
    if weights == "imagenet":
        state = _load_imagenet_state_dict(name)  # fails fast (before building) when offline
        full = torchvision.models.get_model(name, weights=None)
        full.load_state_dict(state, strict=True)
        source = f"torchvision:{_torchvision_v1_weights(name)}"
        return TorchvisionResNetFeatures(full, name, layers, source)

    state, file = _load_local_state_dict(weights)
    full = torchvision.models.get_model(name, weights=None)
    extractor = TorchvisionResNetFeatures(full, name, layers, f"file:{file}")
    for target in (full, extractor):  # a full torchvision file, or only the kept parts
        missing, unexpected = _key_diff(target, state)
        if not missing and not unexpected:
            try:
                target.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise KdadError(f"backbone weights {file} do not fit {name}: {_short(exc)}") from exc
            return extractor
    # Report against the full model when the file holds anything outside the kept parts.
    missing, unexpected = _key_diff(full, state)
    kept_missing, kept_unexpected = _key_diff(extractor, state)
    if len(kept_missing) + len(kept_unexpected) < len(missing) + len(unexpected):
        missing, unexpected = kept_missing, kept_unexpected
    raise KdadError(
        f"backbone weights {file} do not match torchvision {name}: missing keys "
        f"[{_fmt_keys(missing)}], unexpected keys [{_fmt_keys(unexpected)}]; pass a state dict "
        f"saved from torchvision.models.{name}"
    )


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------


def _timm_out_indices(model_name: str, layers: Sequence[str]) -> list[int]:
    indices = []
    for layer in layers:
        match = re.fullmatch(r"layer(\d+)", layer)
        if match is None:
            raise KdadError(
                f"cannot map backbone.layers entry '{layer}' of timm:{model_name} to a feature "
                "index; use names layer1..layer4 (ResNet-like models) or pass backbone.out_indices"
            )
        indices.append(int(match.group(1)))
    return indices


def _build_timm(
    model_name: str, weights: str, layers: Sequence[str], out_indices: Sequence[int] | None
) -> FeatureExtractor:
    import timm  # local import: timm is slow to import and only needed here

    layers = list(layers)
    indices = list(out_indices) if out_indices is not None else _timm_out_indices(model_name, layers)
    if out_indices is not None:
        layers = [f"index{i}" for i in indices]
    name = f"timm:{model_name}"
    if not timm.is_model(model_name.split(".", 1)[0]):
        raise KdadError(f"unknown timm model '{model_name}' in backbone {name}; see timm.list_models() for valid names")
    if weights == "imagenet" and "." not in model_name:
        raise KdadError(
            f"backbone {name} has no pretrained tag, so its ImageNet weights are ambiguous; name "
            f"them explicitly, e.g. timm:{model_name}.<tag> (such as timm:resnet18.a1_in1k)"
        )
    try:
        body = timm.create_model(model_name, pretrained=weights == "imagenet", features_only=True, out_indices=indices)
        source = f"timm:{model_name}" if weights == "imagenet" else "none (random init)"
    except _NETWORK_ERRORS as exc:
        if weights == "imagenet":
            raise KdadError(
                f"could not get ImageNet weights for {name} ({_short(exc)}); {_download_hint(name)}"
            ) from exc
        raise KdadError(f"could not build backbone {name} ({_short(exc)})") from exc
    if weights not in ("imagenet", "none"):
        state, file = _load_local_state_dict(weights)
        kept_prefixes = {key.split(".", 1)[0] for key in body.state_dict()}
        # Keys of pruned parts (e.g. layer4, fc) are allowed; every kept key must be present.
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] in kept_prefixes}
        missing, unexpected = _key_diff(body, state)
        if missing or unexpected:
            raise KdadError(
                f"backbone weights {file} do not match {name}: missing keys "
                f"[{_fmt_keys(missing)}], unexpected keys [{_fmt_keys(unexpected)}]"
            )
        try:
            body.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise KdadError(f"backbone weights {file} do not fit {name}: {_short(exc)}") from exc
        source = f"file:{file}"
    return TimmFeatures(body, name, layers, source)


# ----------------------------------------------------------------------------------------------
# public entry point
# ----------------------------------------------------------------------------------------------


def build_backbone(
    name: str,
    weights: str = "imagenet",
    layers: Sequence[str] = ("layer1", "layer2", "layer3"),
    out_indices: Sequence[int] | None = None,
) -> FeatureExtractor:
    """Build a feature extractor.

    Args:
        name: a torchvision ResNet name (see :data:`TORCHVISION_RESNETS`) or ``timm:<model>``.
        weights: ``"imagenet"`` (torchvision IMAGENET1K_V1, or the timm tag in the name),
            ``"none"`` (random init) or a path to a local state-dict file.
        layers: stage names to return, in output order (``layer1``..``layer4``).
        out_indices: timm only: explicit feature indices (overrides ``layers``).

    Raises:
        KdadError: unknown name/layers, missing or mismatching weights file, or ImageNet
            weights that cannot be downloaded (one line saying how to continue offline).
    """
    weights = str(weights)
    if weights.lower() in ("none", "null", "random"):
        weights = "none"
    elif weights.lower() == "imagenet":
        weights = "imagenet"
    if name.startswith("timm:"):
        return _build_timm(name[len("timm:") :], weights, layers, out_indices)
    if out_indices is not None:
        raise KdadError(f"backbone.out_indices is only for timm backbones, not for {name}; use backbone.layers")
    return _build_torchvision(name, weights, layers)


#: ``weights`` value that tries ImageNet weights and falls back to random init (demo only).
IMAGENET_OR_NONE = "imagenet_or_none"


def build_backbone_with_fallback(
    name: str,
    weights: str = "imagenet",
    layers: Sequence[str] = ("layer1", "layer2", "layer3"),
) -> FeatureExtractor:
    """:func:`build_backbone`, plus the demo's ``weights="imagenet_or_none"``.

    ``imagenet_or_none`` uses ImageNet weights when they can be had (download or torch hub
    cache) and otherwise says loudly that it falls back to random init; ``weights_source``
    records which. Every other value behaves exactly like :func:`build_backbone` (a failed
    download is an error, never a silent fallback).
    """
    if str(weights) != IMAGENET_OR_NONE:
        return build_backbone(name, weights, layers)
    try:
        return build_backbone(name, "imagenet", layers)
    except KdadError as error:
        banner = "!" * 78
        message = (
            f"ImageNet weights for {name} are not available ({error}). FALLING BACK TO RANDOM-INIT "
            "WEIGHTS: scores will be lower than with a pretrained teacher."
        )
        logging.getLogger("kdad").warning("\n%s\n%s\n%s", banner, message, banner)
        extractor = build_backbone(name, "none", layers)
        extractor.weights_source = "none (random init; fallback: ImageNet weights unavailable)"
        return extractor
