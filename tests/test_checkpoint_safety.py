"""Loading a checkpoint never runs code from the file, and every bad checkpoint is one line.

Complements tests/test_evaluation.py (missing file, a fake zip header, no kdad metadata, an
unknown method name, format 99, a pickled ``print``): here the pickle payload has a visible
effect (it creates a file), checkpoints are real ones cut short, and the method/version checks
of :func:`kdad.checkpoint.load_model` are exercised."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kdad.checkpoint import load_model, read_checkpoint, recorded_image_size
from kdad.errors import KdadError
from kdad.methods import ReverseDistillation


class CreatesFile:
    """Unpickling this object creates ``path`` (what a malicious ``__reduce__`` would do)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A genuine kdad checkpoint dict of a tiny RD (what kdad-train's ModelCheckpoint stores)."""
    torch.manual_seed(0)
    model = ReverseDistillation(backbone="resnet18", weights="none")
    content: dict[str, Any] = {"state_dict": model.state_dict(), "epoch": 1}
    model.on_save_checkpoint(content)
    return content


@pytest.fixture(scope="module")
def light(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The same metadata with two tensors only: for checks that fail before weights load."""
    return {**checkpoint, "state_dict": dict(list(checkpoint["state_dict"].items())[:2])}


def _save(content: dict[str, Any], path: Path) -> Path:
    torch.save(content, path)
    return path


def _one_line_error(call: Any, match: str) -> str:
    with pytest.raises(KdadError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_genuine_checkpoint_loads(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    path = _save(checkpoint, tmp_path / "good.ckpt")
    model, meta = load_model(path, expected_method="rd")
    assert isinstance(model, ReverseDistillation) and meta["method"] == "rd" and not model.training


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["zip", "legacy_torch", "plain_pickle"])
def test_a_pickle_that_would_create_a_file_is_refused_and_creates_nothing(
    light: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, container: str
) -> None:
    marker = tmp_path / "pwned"
    content = {**light, "callbacks": {"evil": CreatesFile(marker)}}
    path = tmp_path / "evil.ckpt"
    if container == "plain_pickle":
        path.write_bytes(pickle.dumps(content))
    else:
        torch.save(content, path, _use_new_zipfile_serialization=container == "zip")
    # the payload is live: an unrestricted load creates the file
    torch.load(path, weights_only=False) if container != "plain_pickle" else pickle.loads(path.read_bytes())
    assert marker.exists()
    marker.unlink()
    # kdad refuses it, also when the environment asks torch for unrestricted loads
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    _one_line_error(lambda: read_checkpoint(path), "could not be read safely")
    _one_line_error(lambda: load_model(path), "could not be read safely")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.999])
def test_a_truncated_checkpoint_is_a_one_line_error(checkpoint: dict[str, Any], tmp_path: Path, keep: float) -> None:
    data = _save(checkpoint, tmp_path / "full.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: int(len(data) * keep)])
    message = _one_line_error(lambda: load_model(cut), "could not be read safely")
    assert str(cut) in message


@pytest.mark.parametrize("size", [1, 64, 4096])
def test_random_bytes_are_a_one_line_error(tmp_path: Path, size: int) -> None:
    path = tmp_path / "random.ckpt"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())
    _one_line_error(lambda: load_model(path), "could not be read safely")


def test_a_checkpoint_of_another_method_is_refused_when_a_method_is_expected(
    light: dict[str, Any], tmp_path: Path
) -> None:
    path = _save(light, tmp_path / "rd.ckpt")
    message = _one_line_error(
        lambda: load_model(path, expected_method="urd"), "holds a 'rd' model, not the requested 'urd'"
    )
    assert str(path) in message


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format": None}, "format None .*this kdad reads format 1"),  # written before formats were recorded
        ({"format": "1"}, "format 1 .*this kdad reads format 1"),  # a string is not the format number
        (
            {"hparams": {"backbone": "resnet18", "option_from_the_future": 1}},
            "cannot rebuild .*option_from_the_future.*kdad 0.1.0",
        ),
        ({"hparams": ["resnet18"]}, "unreadable hyper-parameters"),
    ],
)
def test_an_incompatible_format_or_version_is_a_one_line_error(
    light: dict[str, Any], tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    content = {**light, "kdad": {**light["kdad"], **change}}
    path = _save(content, tmp_path / "old.ckpt")
    _one_line_error(lambda: load_model(path), match)


def test_weights_of_another_architecture_are_a_one_line_error(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("decoder.")}
    state["extra.weight"] = torch.zeros(1)
    path = _save({**checkpoint, "state_dict": state}, tmp_path / "other.ckpt")
    _one_line_error(lambda: load_model(path), r"does not fit method 'rd' \(missing \d+ keys.*unexpected 1")


def test_metadata_that_is_not_a_mapping_is_refused(light: dict[str, Any], tmp_path: Path) -> None:
    path = _save({**light, "kdad": "rd"}, tmp_path / "odd.ckpt")
    _one_line_error(lambda: read_checkpoint(path), "not written by kdad-train")


def test_recorded_image_size(tmp_path: Path) -> None:
    assert recorded_image_size({"datamodule": {"image_size": 64}}, "x.ckpt") == (64, 64)
    assert recorded_image_size({"datamodule": {"image_size": [32, 48]}}, "x.ckpt") == (32, 48)
    assert recorded_image_size({"datamodule": {"image_size": 64}}, "x.ckpt", [16, 32]) == (16, 32)
    _one_line_error(
        lambda: recorded_image_size({"datamodule": None}, "x.ckpt"), r"x.ckpt records no input size; pass image_size="
    )
