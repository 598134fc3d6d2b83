"""kdad-export: the exported ONNX / TorchScript graph is the model's ``forward``.

For every method (tiny resnet18 models, random init, BatchNorm statistics randomised so that
a graph that ignored them would fail), the file exported at batch 1 is run at batch 2 and 3 and
compared with PyTorch on the same uint8 images (the exported input is ``uint8 / 255`` as float32,
the documented contract): ONNX through onnxruntime within 1e-4, TorchScript through
``torch.jit.load`` within 1e-5. A real checkpoint written by kdad-train (in-process, one epoch,
with normal-data thresholds) goes through kdad-export's task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch import Tensor, nn

from kdad.checkpoint import load_model
from kdad.config import config_dir, register_resolvers
from kdad.data import generate_demo_dataset
from kdad.errors import KdadError
from kdad.export import INPUT_CONTRACT, export_onnx, export_torchscript, sidecar_path
from kdad.methods import METHODS, AnomalyModule

register_resolvers()

# the tests load TorchScript files themselves (PyTorch 2.15 deprecates TorchScript)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.load.* is deprecated:FutureWarning")

SIZE = 32
#: the smallest tiny configuration of each method (adps: k=2 patches need sides of 2*16)
OPTIONS: dict[str, dict[str, Any]] = {"rd": {}, "urd": {}, "adps": {"k": 2}, "tdad": {}, "dskd": {}}


def test_every_method_is_covered() -> None:
    assert set(OPTIONS) == set(METHODS)


def _tiny(name: str) -> AnomalyModule:
    """A tiny model with non-trivial BatchNorm running statistics (eval mode uses them)."""
    torch.manual_seed(0)
    model = METHODS[name](backbone="resnet18", weights="none", **OPTIONS[name])
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
    return model.eval()


def _images(batch: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, SIZE, SIZE), generator=generator, dtype=torch.uint8)


def _as_input(images: Tensor) -> np.ndarray:
    """The documented input contract: float32 RGB in [0, 1]."""
    return (images.float() / 255.0).numpy()


def _reference(model: AnomalyModule, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch on kdad's own input (uint8), as kdad-eval and kdad-predict run it."""
    with torch.no_grad():
        output = model(images)
    anomaly_map, score = output.anomaly_map.numpy(), output.score.numpy()
    assert anomaly_map.std() > 0 and (len(score) == 1 or np.ptp(score) > 0), (
        "degenerate outputs make the comparison vacuous"
    )
    return anomaly_map, score


def _check(got: tuple[Any, Any], expected: tuple[np.ndarray, np.ndarray], tolerance: float) -> None:
    for value, reference in zip(got, expected, strict=True):
        value = np.asarray(value)
        assert value.dtype == np.float32 and value.shape == reference.shape
        np.testing.assert_allclose(value, reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.numerics
def test_onnx_equals_pytorch_at_other_batch_sizes(name: str, tmp_path: Path) -> None:
    model = _tiny(name)
    model.normal_thresholds = {"image": 0.25, "pixel": 0.5, "fpr": 0.01}
    exported = export_onnx(model, tmp_path / "model.onnx", SIZE, verify=False)
    proto = onnx.load(str(exported.path))
    assert [i.name for i in proto.graph.input] == ["image"] and proto.graph.input[0].doc_string == INPUT_CONTRACT
    assert [o.name for o in proto.graph.output] == ["anomaly_map", "score"]
    embedded = json.loads({p.key: p.value for p in proto.metadata_props}["kdad"])
    assert embedded["method"] == name and embedded["image_size"] == [SIZE, SIZE]
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        images = _images(batch, seed=batch)
        _check(session.run(None, {"image": _as_input(images)}), _reference(model, images), 1e-4)
    sidecar = json.loads(sidecar_path(exported.path).read_text())
    assert sidecar == exported.metadata and sidecar["verification"] is None
    assert sidecar["format"] == "onnx" and sidecar["method"] == name and sidecar["backbone"] == "resnet18"
    assert sidecar["input"]["shape"] == ["batch", 3, SIZE, SIZE] and sidecar["input"]["contract"] == INPUT_CONTRACT
    assert sidecar["normal_thresholds"] == model.normal_thresholds


# TorchScript traces the same forward as the ONNX tracing exporter (checked for every method
# above): RD and ADPS (patch split/stitch, segmentation head) cover both kinds of graph; the
# others cost ~6 s each on 2 cores
@pytest.mark.parametrize("name", ["rd", "adps"])
@pytest.mark.numerics
def test_torchscript_equals_pytorch_at_other_batch_sizes(name: str, tmp_path: Path) -> None:
    model = _tiny(name)
    exported = export_torchscript(model, tmp_path / "model.pt", SIZE, verify=False)
    extra = {"kdad.json": ""}
    loaded = torch.jit.load(str(exported.path), _extra_files=extra)
    assert json.loads(extra["kdad.json"])["method"] == name
    for batch in (2, 3):
        images = _images(batch, seed=10 + batch)
        with torch.no_grad():
            got = [t.numpy() for t in loaded(images.float() / 255.0)]
        _check(got, _reference(model, images), 1e-5)
    assert exported.metadata["normal_thresholds"] is None


class BatchBakedModel(AnomalyModule):
    """A deliberately untraceable method: its student depends on a Python ``int`` of the batch
    size, which tracing bakes in (batch 1) -- the verification must catch it."""

    method_name = "batch_baked"

    def __init__(self) -> None:
        super().__init__(anomaly_map={"sigma": 0})
        self.net = nn.Conv2d(3, 4, 3, padding=1)

    def teacher_student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        teacher = self.net(x)
        offsets = torch.arange(int(x.shape[0]), dtype=teacher.dtype).view(-1, 1, 1, 1)  # image i: +i
        return [teacher], [teacher + offsets]


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_verification_refuses_a_graph_that_baked_the_batch_size(fmt: str, tmp_path: Path) -> None:
    model = BatchBakedModel().eval()
    export = export_onnx if fmt == "onnx" else export_torchscript
    with pytest.raises(KdadError, match=r"differs from PyTorch .* batch sizes \[2, 3\]") as info:
        export(model, tmp_path / f"model.{fmt}", 8)
    assert "\n" not in str(info.value) and "exporter=dynamo" in str(info.value)
    assert not (tmp_path / f"model.{fmt}").exists() and not sidecar_path(tmp_path / f"model.{fmt}").exists()


def test_wrong_input_size_and_options_are_one_line_errors(tmp_path: Path) -> None:
    model = _tiny("rd")
    with pytest.raises(KdadError, match=r"multiples of 32.*data.image_size"):
        export_onnx(model, tmp_path / "m.onnx", 48, verify=False)
    with pytest.raises(KdadError, match="exporter='jit'"):
        export_onnx(model, tmp_path / "m.onnx", SIZE, exporter="jit")


class TinyDistillation(AnomalyModule):
    """Two small conv pyramids (2 levels) through the shared normalisation, map and score."""

    method_name = "tiny"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.teacher = nn.ModuleList([nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)])
        self.student = nn.ModuleList([nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)])

    def teacher_student_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        pyramids = []
        for layers in (self.teacher, self.student):
            features, h = [], x
            for layer in layers:
                h = torch.relu(layer(h))
                features.append(h)
            pyramids.append(features)
        return pyramids[0], pyramids[1]


@pytest.mark.slow
@pytest.mark.numerics
def test_dynamo_exporter_equals_pytorch(tmp_path: Path) -> None:
    """The torch.export-based exporter (exporter=dynamo) with its own verification on; on a tiny
    model to keep the suite fast (every kdad method exports with it: docs/export.md)."""
    model = TinyDistillation().eval()
    exported = export_onnx(model, tmp_path / "model.onnx", SIZE, exporter="dynamo")
    assert exported.metadata["onnx"] == {"opset": 18, "exporter": "dynamo"}
    assert exported.metadata["verification"]["max_abs_difference"]["anomaly_map"] < 1e-4
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        images = _images(batch, seed=20 + batch)
        _check(session.run(None, {"image": _as_input(images)}), _reference(model, images), 1e-4)


# ------------------------------------------------------------------------------ a kdad-train checkpoint


def _compose(name: str, overrides: list[str]) -> Any:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def test_export_config_composes(tmp_path: Path) -> None:
    cfg = _compose("export", ["ckpt=/some/last.ckpt", f"paths.output_dir={tmp_path}"])
    assert cfg.ckpt == "/some/last.ckpt" and cfg.format == "onnx" and cfg.exporter == "tracing"
    assert cfg.image_size is None and cfg.output is None and cfg.verify is True


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One epoch of kdad-train (in-process, the real composition) for RD on the demo weave at
    32 px, half of the 8 normal training images held out for the normal-data thresholds."""
    from kdad.cli.train import train

    tmp = tmp_path_factory.mktemp("export")
    root = generate_demo_dataset(
        tmp / "demo", categories=["weave"], image_size=SIZE, n_train=8, n_test_good=2, n_test_defect=2
    )
    run = tmp / "run"
    train(
        _compose(
            "train",
            [
                "experiment=demo",
                "hydra.sweeper.params=null",
                f"data.root={root}",
                "data.category=weave",
                f"data.image_size={SIZE}",
                "data.holdout_fraction=0.5",
                "trainer.max_epochs=1",
                "trainer.accelerator=cpu",
                "backbone.weights=none",
                "callbacks.progress_bar=null",
                "logger=none",
                "test=false",
                "print_config=false",
                f"paths.output_dir={run}",
                f"paths.work_dir={tmp}",
            ],
        )
    )
    ckpt = run / "checkpoints" / "last.ckpt"
    model, meta = load_model(ckpt)
    images = sorted((root / "weave" / "test").rglob("*.png"))
    assert len(images) == 4
    batch = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in images])
    return {"ckpt": ckpt, "model": model, "meta": meta, "images": batch, "tmp": tmp}


@pytest.mark.slow
def test_kdad_export_writes_onnx_and_sidecar_from_a_checkpoint(trained: dict[str, Any], tmp_path: Path) -> None:
    """kdad-export's task (in-process: a subprocess would double this file's time) on the
    kdad-train checkpoint: sidecar with the stored thresholds, ONNX equal to the loaded model."""
    from kdad.cli.export import export

    output = tmp_path / "models" / "rd.onnx"
    cfg = _compose(
        "export", [f"ckpt={trained['ckpt']}", f"output={output}", "expected_method=rd", f"paths.output_dir={tmp_path}"]
    )
    exported = export(cfg)
    assert exported.path == output
    sidecar = json.loads(sidecar_path(output).read_text())
    stored = trained["meta"]["thresholds"]
    assert stored and set(stored) >= {"image", "pixel"}, (
        "kdad-train stores normal-data thresholds with data.holdout_fraction"
    )
    assert sidecar["normal_thresholds"] == stored
    assert (
        sidecar["image_size"] == [SIZE, SIZE]
        and sidecar["method"] == "rd"
        and sidecar["checkpoint"] == str(trained["ckpt"])
    )
    assert (
        sidecar["verification"]["batch_sizes"] == [2, 3]
        and max(sidecar["verification"]["max_abs_difference"].values()) < 1e-4
    )
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    images = trained["images"]
    _check(session.run(None, {"image": _as_input(images)}), _reference(trained["model"], images), 1e-4)


@pytest.mark.slow
def test_export_entry_point_writes_torchscript_into_the_run_folder(trained: dict[str, Any], tmp_path: Path) -> None:
    from kdad.cli.export import export

    cfg = _compose(
        "export", [f"ckpt={trained['ckpt']}", "format=torchscript", "verify=false", f"paths.output_dir={tmp_path}"]
    )
    exported = export(cfg)
    assert exported.path == tmp_path / "model.pt" and exported.sidecar == tmp_path / "model.pt.json"
    assert exported.metadata["normal_thresholds"] == trained["meta"]["thresholds"]
    loaded = torch.jit.load(str(exported.path))
    images = trained["images"][:3]
    with torch.no_grad():
        got = [t.numpy() for t in loaded(images.float() / 255.0)]
    _check(got, _reference(trained["model"], images), 1e-5)


@pytest.mark.slow
def test_export_of_a_checkpoint_of_another_method_is_refused(trained: dict[str, Any], tmp_path: Path) -> None:
    from kdad.cli.export import export

    cfg = _compose("export", [f"ckpt={trained['ckpt']}", "expected_method=urd", f"paths.output_dir={tmp_path}"])
    with pytest.raises(KdadError, match="holds a 'rd' model, not the requested 'urd'"):
        export(cfg)
    assert not list(tmp_path.glob("model.*"))
