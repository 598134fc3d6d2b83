"""Backbones: kept parts, outputs vs the full torchvision/timm model, weight loading and the
offline error paths (the network is never touched: downloads are monkeypatched)."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from kdad.errors import KdadError
from kdad.models import build_backbone, count_parameters, imagenet_weights_available
from kdad.models.backbones import torchvision_weights_url


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache and a download function that fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch_home"


def _reference_features(full: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Obviously-correct forward through the full torchvision model."""
    out = {}
    y = full.maxpool(full.relu(full.bn1(full.conv1(x))))
    for name in ("layer1", "layer2", "layer3", "layer4"):
        y = getattr(full, name)(y)
        out[name] = y
    return out


def _randomise_bn_stats(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


def test_kept_parts_and_metadata() -> None:
    enc = build_backbone("resnet18", weights="none")
    names = [n for n, _ in enc.named_children()]
    assert names == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"]
    assert not any(k.startswith(("layer4", "fc")) for k in enc.state_dict())
    assert enc.channels == [64, 128, 256] and enc.reductions == [4, 8, 16]
    assert enc.weights_source == "none (random init)" and enc.name == "resnet18"
    assert count_parameters(enc, trainable_only=True) == count_parameters(enc)
    enc.requires_grad_(False)
    assert count_parameters(enc, trainable_only=True) == 0 < count_parameters(enc)
    shallow = build_backbone("resnet50", weights="none", layers=("layer2", "layer1"))
    assert not hasattr(shallow, "layer3")  # nothing beyond the deepest requested stage
    assert shallow.channels == [512, 256] and shallow.reductions == [8, 4]
    out = shallow(torch.randn(1, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(1, 512, 4, 4), (1, 256, 8, 8)]


def test_full_torchvision_file_loads_and_matches_reference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = torchvision.models.resnet18(weights=None)
    _randomise_bn_stats(full)
    path = tmp_path / "resnet18-full.pth"
    torch.save(full.state_dict(), path)
    enc = build_backbone("resnet18", weights=str(path)).eval()
    assert enc.weights_source == f"file:{path.resolve()}"
    full.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = _reference_features(full, x)
        out = enc(x)
    for got, layer in zip(out, ("layer1", "layer2", "layer3"), strict=True):
        torch.testing.assert_close(got, ref[layer])


def test_kept_parts_file_and_old_format_load(tmp_path: Path) -> None:
    torch.manual_seed(1)
    full = torchvision.models.resnet18(weights=None)
    _randomise_bn_stats(full)
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith(("layer4", "fc"))}
    torch.save(kept, tmp_path / "kept.pth")
    enc = build_backbone("resnet18", weights=str(tmp_path / "kept.pth"))
    torch.testing.assert_close(enc.layer3[1].bn2.running_var, full.layer3[1].bn2.running_var)
    # Old torchvision files (like wide_resnet50_2-95faca4d.pth) have no num_batches_tracked.
    old = {k: v for k, v in full.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    enc = build_backbone("resnet18", weights=str(tmp_path / "old.pth"))
    torch.testing.assert_close(enc.conv1.weight, full.conv1.weight)


def test_mismatching_file_is_one_line_kdad_error(tmp_path: Path) -> None:
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(KdadError) as info:
        build_backbone("resnet18", weights=str(path))
    msg = str(info.value)
    assert "\n" not in msg and str(path.resolve()) in msg
    assert "unexpected keys" in msg and "layer1.2." in msg

    state = torchvision.models.resnet18(weights=None).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)  # same keys, wrong shape
    torch.save(state, tmp_path / "bad_shape.pth")
    with pytest.raises(KdadError, match=r"bad_shape.pth"):
        build_backbone("resnet18", weights=str(tmp_path / "bad_shape.pth"))

    missing = torchvision.models.resnet18(weights=None).state_dict()
    del missing["layer3.1.conv2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(KdadError, match=r"missing keys \[layer3\.1\.conv2\.weight\]"):
        build_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_missing_file_and_bad_names() -> None:
    with pytest.raises(KdadError, match="not found"):
        build_backbone("resnet18", weights="/nonexistent/dir/resnet18.pth")
    with pytest.raises(KdadError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16", weights="none")
    with pytest.raises(KdadError, match=r"backbone.layers"):
        build_backbone("resnet18", weights="none", layers=("layer5",))


def test_imagenet_download_failure_is_actionable(empty_torch_home: Path) -> None:
    assert not imagenet_weights_available("wide_resnet50_2")
    with pytest.raises(KdadError) as info:
        build_backbone("wide_resnet50_2", weights="imagenet")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("could not get ImageNet weights for wide_resnet50_2 (URLError")
    assert "backbone.weights=/path/to/wide_resnet50_2-95faca4d.pth" in msg
    assert "backbone.weights=none" in msg


def test_imagenet_weights_load_offline_from_hub_cache(empty_torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = torchvision_weights_url("resnet18")
    assert url.endswith("resnet18-f37072fd.pth")  # IMAGENET1K_V1, not V2/DEFAULT
    torch.manual_seed(2)
    full = torchvision.models.resnet18(weights=None)
    cache = empty_torch_home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    assert not imagenet_weights_available("resnet18")
    torch.save(full.state_dict(), cache / "resnet18-f37072fd.pth")
    assert imagenet_weights_available("resnet18")
    enc = build_backbone("resnet18", weights="imagenet")
    assert enc.weights_source == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    torch.testing.assert_close(enc.layer2[0].conv1.weight, full.layer2[0].conv1.weight)


def test_wide_resnet_uses_v1_url() -> None:
    assert torchvision_weights_url("wide_resnet50_2").endswith("wide_resnet50_2-95faca4d.pth")


# ---------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------


def test_timm_random_init_offline() -> None:
    enc = build_backbone("timm:resnet18.a1_in1k", weights="none")
    assert enc.channels == [64, 128, 256] and enc.reductions == [4, 8, 16]
    assert enc.weights_source == "none (random init)"
    assert not any("layer4" in k or k.startswith("fc") for k in enc.state_dict())
    out = enc(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4)]
    assert count_parameters(enc) == count_parameters(build_backbone("resnet18", weights="none"))


def test_timm_local_file_matches_full_model(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(3)
    full = timm.create_model("resnet18", pretrained=False).eval()
    _randomise_bn_stats(full)
    torch.save(full.state_dict(), tmp_path / "timm_r18.pth")
    enc = build_backbone("timm:resnet18.a1_in1k", weights=str(tmp_path / "timm_r18.pth")).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = full.maxpool(full.act1(full.bn1(full.conv1(x))))
        refs = []
        for stage in (full.layer1, full.layer2, full.layer3):
            y = stage(y)
            refs.append(y)
        out = enc(x)
    for got, want in zip(out, refs, strict=True):
        torch.testing.assert_close(got, want)


def test_timm_imagenet_needs_tag_and_reports_download_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(KdadError, match="unknown timm model"):
        build_backbone("timm:no_such_net.tag", weights="imagenet")
    with pytest.raises(KdadError, match="no pretrained tag"):
        build_backbone("timm:resnet18", weights="imagenet")
    import timm

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(KdadError, match=r"could not get ImageNet weights for timm:resnet18\.a1_in1k"):
        build_backbone("timm:resnet18.a1_in1k", weights="imagenet")
