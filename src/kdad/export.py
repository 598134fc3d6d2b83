"""Export a trained kdad model as one inference graph: ONNX or TorchScript.

The exported graph is exactly the method's ``forward`` (:meth:`kdad.methods.base.AnomalyModule.forward`):
ImageNet normalisation, teacher(s) and student(s), the anomaly map, Gaussian smoothing and the
image score, with a dynamic batch dimension and a fixed input size (the training size).

Input contract (the same for ONNX and TorchScript): ``image``, float32 ``[B, 3, H, W]``, RGB,
values in ``[0, 1]`` (not ImageNet-normalised: the graph normalises). kdad itself resizes images
to ``(H, W)`` with PIL bilinear, no crop. Outputs: ``anomaly_map`` float32 ``[B, 1, H, W]``
(smoothed) and ``score`` float32 ``[B]`` (max of the smoothed map). The model's uint8 path is not
in the graph: feeding uint8 (or 0-255 floats) to an exported model gives wrong numbers.

ONNX exporters (``exporter``):

- ``tracing`` (default): PyTorch's TorchScript-based ``torch.onnx.export(dynamo=False)``. It
  traces at batch 1 with ``dynamic_axes``; about ten times faster than ``dynamo`` here (2-4 s vs
  10-20 s for a resnet18 model on a CPU) and works for every kdad method. PyTorch marks it
  deprecated; tracing cannot see Python arithmetic on the batch size, which is why every export
  is verified at other batch sizes (below).
- ``dynamo``: the ``torch.export``-based exporter (needs ``onnxscript``); symbolic batch size,
  exported with an example batch of 2 (``torch.export`` specialises a batch of 1).

Verification (``verify=True``, default): the exported file is run (onnxruntime / ``torch.jit.load``)
on random images at batch sizes :data:`VERIFY_BATCH_SIZES` and compared with the PyTorch model;
a difference above the tolerance (1e-4 ONNX, 1e-5 TorchScript) is a :class:`KdadError`.

Next to the exported file, ``<file>.json`` (:func:`sidecar_path`) records the input size, the
input contract, method, backbone, kdad/torch versions, the normal-data thresholds stored in the
checkpoint (``checkpoint["kdad"]["thresholds"]``, if any) and the verification result. The same
description (without the verification) is embedded in the file: ONNX ``metadata_props["kdad"]``,
TorchScript extra file ``kdad.json``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import kdad
from kdad.data.dataset import as_size
from kdad.errors import KdadError, check_choice
from kdad.results import write_json_atomic

log = logging.getLogger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "INPUT_CONTRACT",
    "ONNX_EXPORTERS",
    "Exported",
    "describe_export",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "sidecar_path",
]

EXPORT_FORMATS = ("onnx", "torchscript")
#: file suffix per format (kdad-export's default file name is ``model<suffix>``)
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_EXPORTERS = ("tracing", "dynamo")
DEFAULT_OPSET = 18

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
INPUT_CONTRACT = (
    "float32 [B,3,H,W] RGB in [0,1] (not ImageNet-normalised: the graph normalises); "
    "H,W = image_size, batch size B dynamic"
)
PREPROCESSING = "decode as RGB, resize to image_size (kdad: PIL bilinear, no crop), divide by 255"
#: batch sizes of the verification run; the tracing exporters trace at batch 1
VERIFY_BATCH_SIZES = (2, 3)
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class Exported:
    """An exported model: the file, its JSON sidecar and the sidecar's content."""

    path: Path
    sidecar: Path
    metadata: dict[str, Any]


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (one sidecar per exported file)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def describe_export(
    model: Any,
    image_size: tuple[int, int],
    fmt: str,
    path: Path,
    thresholds: Mapping[str, Any] | None,
    checkpoint: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The sidecar's content (plain JSON types)."""
    height, width = image_size
    hparams = dict(getattr(model, "hparams", {}) or {})
    return {
        "kdad_export": SIDECAR_VERSION,
        "format": fmt,
        "file": path.name,
        "method": model.method_name,
        "backbone": hparams.get("backbone"),
        "kdad_version": kdad.__version__,
        "torch_version": torch.__version__,
        "image_size": [height, width],
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", 3, height, width],
            "contract": INPUT_CONTRACT,
        },
        "preprocessing": PREPROCESSING,
        "outputs": {
            "anomaly_map": {
                "dtype": "float32",
                "shape": ["batch", 1, height, width],
                "meaning": "smoothed anomaly map",
            },
            "score": {
                "dtype": "float32",
                "shape": ["batch"],
                "meaning": "image anomaly score (max of the smoothed map)",
            },
        },
        "normal_thresholds": json.loads(json.dumps(dict(thresholds), default=str)) if thresholds else None,
        "checkpoint": checkpoint,
        **extra,
    }


@contextmanager
def _exporting(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no grad, traceable, and the exporters' expected warnings silenced (tracing
    warns about the input-size checks, which are constant for a fixed size; PyTorch deprecates
    TorchScript and the TorchScript-based ONNX exporter, used on purpose); the training mode is
    restored afterwards."""
    was_training = model.training
    model.eval()
    # tracing reads every attribute of the module; a LightningModule's ``trainer`` raises outside
    # a Trainer unless ``_jit_is_scripting`` is set (as Lightning's own ``to_torchscript`` does)
    model._jit_is_scripting = True
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit\..*")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        del model._jit_is_scripting
        model.train(was_training)


def _example(model: Any, image_size: tuple[int, int], batch: int) -> Tensor:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, *image_size, generator=generator).to(device)


def _checked_size(model: Any, image_size: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)``, checked by the model's own input check (``normalize``) before tracing, where
    its one-line error about ``data.image_size`` cannot be built (traced sizes are tensors)."""
    size = as_size(image_size)
    model.normalize(torch.zeros(1, 3, *size, device=next(model.parameters()).device))
    return size


def _require(module: str, purpose: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise KdadError(
            f"{purpose} needs the '{module}' package; install kdad's export extra: pip install 'kdad[export]'"
        ) from None


_HINT = "the file was removed; with ONNX try exporter=dynamo, and please report it as a kdad bug"


def _verify(
    model: Any,
    run: Callable[[Tensor], tuple[np.ndarray, np.ndarray]],
    image_size: tuple[int, int],
    fmt: str,
    path: Path,
) -> dict[str, Any]:
    """Run the exported model and the PyTorch model on the same random images at
    :data:`VERIFY_BATCH_SIZES`; remove the file and raise when they differ by more than
    ``TOLERANCE[fmt]``."""
    try:
        return _compare(model, run, image_size, fmt, path)
    except KdadError:
        path.unlink(missing_ok=True)
        raise


def _compare(
    model: Any,
    run: Callable[[Tensor], tuple[np.ndarray, np.ndarray]],
    image_size: tuple[int, int],
    fmt: str,
    path: Path,
) -> dict[str, Any]:
    tolerance = TOLERANCE[fmt]
    worst = {"anomaly_map": 0.0, "score": 0.0}
    for batch in VERIFY_BATCH_SIZES:
        images = _example(model, image_size, batch)
        with torch.no_grad():
            expected = model(images)
        try:
            got = run(images)
        except Exception as error:  # noqa: BLE001 - verifying the export: any failure (e.g. a batch size the trace baked in) is reported
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise KdadError(f"exported {fmt} model {path} fails at batch size {batch} ({reason}); {_HINT}") from None
        for name, reference, value in zip(OUTPUT_NAMES, expected, got, strict=True):
            reference = reference.detach().cpu().numpy()
            if value.shape != reference.shape:
                raise KdadError(
                    f"exported {fmt} model {path} gives {name} of shape {list(value.shape)} at batch size {batch}, "
                    f"PyTorch {list(reference.shape)}; {_HINT}"
                )
            worst[name] = max(worst[name], float(np.abs(value - reference).max()))
    if max(worst.values()) > tolerance:
        raise KdadError(
            f"exported {fmt} model {path} differs from PyTorch by {max(worst.values()):.3g} (tolerance {tolerance:g}) "
            f"at batch sizes {list(VERIFY_BATCH_SIZES)}; {_HINT}"
        )
    return {"batch_sizes": list(VERIFY_BATCH_SIZES), "tolerance": tolerance, "max_abs_difference": worst}


def _write_sidecar(path: Path, description: dict[str, Any], verification: dict[str, Any] | None) -> Exported:
    metadata = {**description, "verification": verification}
    sidecar = sidecar_path(path)
    write_json_atomic(sidecar, metadata)
    log.info("exported %s model to %s (sidecar %s)", description["format"], path, sidecar)
    return Exported(path=path, sidecar=sidecar, metadata=metadata)


def export_onnx(
    model: Any,
    path: str | Path,
    image_size: int | Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "tracing",
    verify: bool = True,
    thresholds: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
) -> Exported:
    """Write ``model``'s ``forward`` as one ONNX graph (dynamic batch) plus its sidecar.

    Args:
        model: a kdad method (:class:`~kdad.methods.base.AnomalyModule`), e.g. from
            :func:`kdad.checkpoint.load_model`; exported in eval mode on its device.
        path: the ``.onnx`` file to write (weights inside the file).
        image_size: the input ``H, W`` (an int or ``[H, W]``): the size the model was trained at.
        opset: ONNX opset (default 18: onnxruntime >= 1.14).
        exporter: ``tracing`` | ``dynamo`` (module docstring).
        verify: compare onnxruntime with PyTorch at other batch sizes (needs ``onnxruntime``).
        thresholds: normal-data thresholds for the sidecar; default ``model.normal_thresholds``.
        checkpoint: the checkpoint's path, recorded in the sidecar.
    """
    check_choice("exporter", exporter, ONNX_EXPORTERS)
    onnx = _require("onnx", "ONNX export")
    if exporter == "dynamo":
        _require("onnxscript", "exporter=dynamo")
    size = _checked_size(model, image_size)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    description = describe_export(
        model,
        size,
        "onnx",
        path,
        thresholds if thresholds is not None else getattr(model, "normal_thresholds", None),
        checkpoint,
        onnx={"opset": int(opset), "exporter": exporter},
    )
    verification = None
    with _exporting(model):
        if exporter == "tracing":
            axes = {INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in OUTPUT_NAMES}}
            torch.onnx.export(
                model,
                (_example(model, size, 1),),
                str(path),
                dynamo=False,
                opset_version=int(opset),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_axes=axes,
            )
        else:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model,
                (_example(model, size, 2),),
                str(path),
                dynamo=True,
                opset_version=int(opset),
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(path))
        proto.doc_string = f"kdad {model.method_name} anomaly detector: image -> (anomaly_map, score)"
        proto.graph.input[0].doc_string = INPUT_CONTRACT
        del proto.metadata_props[:]
        for key, value in (("kdad", json.dumps(description)), ("input_contract", INPUT_CONTRACT)):
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(path))
        if verify:
            ort = _require("onnxruntime", "verify=true (the check against PyTorch)")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

            def run(images: Tensor) -> tuple[np.ndarray, np.ndarray]:
                anomaly_map, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images.cpu().numpy()})
                return anomaly_map, score

            verification = _verify(model, run, size, "onnx", path)
    return _write_sidecar(path, description, verification)


def export_torchscript(
    model: Any,
    path: str | Path,
    image_size: int | Sequence[int],
    *,
    verify: bool = True,
    thresholds: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
) -> Exported:
    """Write ``model``'s ``forward`` as a traced TorchScript module (``torch.jit.load``; returns
    the tuple ``(anomaly_map, score)``) plus its sidecar. Arguments as :func:`export_onnx`."""
    size = _checked_size(model, image_size)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    description = describe_export(
        model,
        size,
        "torchscript",
        path,
        thresholds if thresholds is not None else getattr(model, "normal_thresholds", None),
        checkpoint,
    )
    verification = None
    with _exporting(model):
        traced = torch.jit.trace(model, _example(model, size, 1), check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={"kdad.json": json.dumps(description)})
        if verify:
            loaded = torch.jit.load(str(path), map_location=next(model.parameters()).device)

            def run(images: Tensor) -> tuple[np.ndarray, np.ndarray]:
                anomaly_map, score = loaded(images)
                return anomaly_map.cpu().numpy(), score.cpu().numpy()

            verification = _verify(model, run, size, "torchscript", path)
    return _write_sidecar(path, description, verification)


def export_model(
    model: Any,
    path: str | Path,
    image_size: int | Sequence[int],
    fmt: str = "onnx",
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "tracing",
    verify: bool = True,
    thresholds: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
) -> Exported:
    """:func:`export_onnx` or :func:`export_torchscript` by ``fmt`` (``format`` in kdad-export);
    ``opset`` and ``exporter`` apply to ONNX only."""
    check_choice("format", fmt, EXPORT_FORMATS)
    common: dict[str, Any] = {"verify": verify, "thresholds": thresholds, "checkpoint": checkpoint}
    if fmt == "onnx":
        return export_onnx(model, path, image_size, opset=opset, exporter=exporter, **common)
    return export_torchscript(model, path, image_size, **common)
