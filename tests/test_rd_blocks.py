"""RD OCBE + decoder: parameter counts from the spec (rd_urd.md §1-2, §8), hand-computed counts,
shapes, gradient flow, wiring and init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdad.errors import KdadError
from kdad.models import build_backbone, count_parameters
from kdad.models.rd_blocks import (
    OneClassBottleneck,
    ResNetDecoder,
    UpBottleneck,
    build_rd_student,
)

BACKBONES = ["resnet18", "resnet34", "resnet50", "wide_resnet50_2"]


def _meta_student(name: str, legacy: bool = False) -> tuple[OneClassBottleneck, ResNetDecoder]:
    with torch.device("meta"):  # no memory, no init cost: counts and shapes only
        return build_rd_student(name, legacy_unused_conv4=legacy)


def _mff_count(ocbe: OneClassBottleneck) -> int:
    return sum(count_parameters(m) for m in ocbe.mff_modules)


# ---------------------------------------------------------------------------------------------
# parameter counts: wide_resnet50_2 against the spec's verified numbers
# ---------------------------------------------------------------------------------------------


def test_wrn_counts_match_spec() -> None:
    ocbe, decoder = _meta_student("wide_resnet50_2")
    legacy, _ = _meta_student("wide_resnet50_2", legacy=True)
    assert count_parameters(ocbe) == 58_885_120
    assert _mff_count(ocbe) == 10_621_952
    assert count_parameters(ocbe.oce) == 48_263_168
    assert count_parameters(legacy) == 67_277_824
    assert count_parameters(legacy.conv4) + count_parameters(legacy.bn4) == 8_392_704
    assert count_parameters(decoder) == 24_917_504
    assert [count_parameters(getattr(decoder, f"layer{i}")) for i in (1, 2, 3)] == [
        17_840_128,
        5_317_632,
        1_759_744,
    ]
    # Official state-dict names (resnet.py::BN_layer, de_resnet.py), so checkpoints map 1:1.
    keys = set(legacy.state_dict())
    assert {"conv1.weight", "bn3.running_var", "conv4.weight", "bn4.bias"} <= keys
    assert {"bn_layer.0.downsample.0.weight", "bn_layer.2.conv3.weight"} <= keys
    dkeys = set(decoder.state_dict())
    assert {"layer1.0.upsample.0.weight", "layer1.0.upsample.1.running_mean"} <= dkeys
    assert {"layer3.5.conv3.weight", "layer2.3.bn2.weight"} <= dkeys
    # RD trainable totals (spec §2.2)
    assert count_parameters(legacy) + count_parameters(decoder) == 92_195_328
    assert count_parameters(ocbe) + count_parameters(decoder) == 83_802_624


def test_wrn_encoder_counts_match_spec() -> None:
    with torch.device("meta"):
        full = torchvision.models.wide_resnet50_2(weights=None)
        enc = build_backbone("wide_resnet50_2", weights="none")
    assert count_parameters(full) == 68_883_240
    assert count_parameters(enc) == 24_862_528
    assert not hasattr(enc, "layer4") and not hasattr(enc, "fc")


# ---------------------------------------------------------------------------------------------
# parameter counts: resnet18 computed by hand from the layer description
# ---------------------------------------------------------------------------------------------


def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout  # no bias anywhere in RD


def bn(c: int) -> int:
    return 2 * c


def test_resnet18_counts_by_hand() -> None:
    # MFF: f1 64->128 (3x3 s2) -> 128->256 (3x3 s2); f2 128->256 (3x3 s2); f3 256 unchanged.
    mff = conv(3, 64, 128) + bn(128) + conv(3, 128, 256) + bn(256) + conv(3, 128, 256) + bn(256)
    # OCE: 2 basic blocks, planes 512. Block 1 on the 3*256 = 768 concat, with a 1x1 s2 shortcut.
    block1 = conv(3, 768, 512) + bn(512) + conv(3, 512, 512) + bn(512) + conv(1, 768, 512) + bn(512)
    block2 = 2 * (conv(3, 512, 512) + bn(512))
    oce = block1 + block2
    conv4 = conv(1, 1024, 512) + bn(512)  # legacy: 1x1 4*C3 -> 2*C3

    def up_stage(cin: int, cout: int, blocks: int) -> int:
        first = conv(2, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)  # deconv 2x2 + 3x3
        first += conv(2, cin, cout) + bn(cout)  # ConvTranspose2d shortcut + BN
        return first + (blocks - 1) * 2 * (conv(3, cout, cout) + bn(cout))

    dec = [up_stage(512, 256, 2), up_stage(256, 128, 2), up_stage(128, 64, 2)]

    ocbe, decoder = build_rd_student("resnet18")
    legacy, _ = _meta_student("resnet18", legacy=True)
    assert _mff_count(ocbe) == mff == 664_832
    assert count_parameters(ocbe.oce) == oce
    assert count_parameters(ocbe) == mff + oce
    assert count_parameters(legacy) == mff + oce + conv4
    assert [count_parameters(getattr(decoder, f"layer{i}")) for i in (1, 2, 3)] == dec
    assert count_parameters(decoder) == sum(dec)


def test_resnet18_encoder_count() -> None:
    full = torchvision.models.resnet18(weights=None)
    enc = build_backbone("resnet18", weights="none")
    expected = count_parameters(full) - count_parameters(full.layer4) - count_parameters(full.fc)
    stem_and_layers = conv(7, 3, 64) + bn(64)
    stem_and_layers += 2 * 2 * (conv(3, 64, 64) + bn(64))  # layer1: 2 blocks, no shortcut
    for cin, cout in ((64, 128), (128, 256)):  # layer2, layer3
        stem_and_layers += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
        stem_and_layers += conv(1, cin, cout) + bn(cout)
        stem_and_layers += 2 * (conv(3, cout, cout) + bn(cout))
    assert count_parameters(enc) == expected == stem_and_layers


# ---------------------------------------------------------------------------------------------
# shapes and gradient flow
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_256_meta(name: str) -> None:
    with torch.device("meta"):
        enc = build_backbone(name, weights="none")
        ocbe, decoder = build_rd_student(name)
        feats = enc(torch.empty(2, 3, 256, 256))
        z = ocbe(feats)
        out = decoder(z)
    assert [f.shape[1] for f in feats] == enc.channels
    assert z.shape == (2, 2 * enc.channels[2], 8, 8)
    assert [o.shape for o in out] == [f.shape for f in feats]


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        "resnet34",
        "resnet50",
        pytest.param("wide_resnet50_2", marks=pytest.mark.slow),  # ~160M params to initialise
    ],
)
def test_shapes_64_real(name: str) -> None:
    torch.manual_seed(0)
    enc = build_backbone(name, weights="none").eval()
    ocbe, decoder = build_rd_student(name)
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 64, 64))
        out = decoder(ocbe(feats))
    assert [tuple(o.shape) for o in out] == [tuple(f.shape) for f in feats]
    assert tuple(feats[0].shape[-2:]) == (16, 16)


def test_resnet18_shapes_256_real() -> None:
    enc = build_backbone("resnet18", weights="none").eval()
    ocbe, decoder = build_rd_student("resnet18")
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 256, 256))
        out = decoder(ocbe(feats))
    assert [tuple(f.shape) for f in feats] == [(1, 64, 64, 64), (1, 128, 32, 32), (1, 256, 16, 16)]
    assert [tuple(o.shape) for o in out] == [tuple(f.shape) for f in feats]


@pytest.mark.parametrize("legacy", [False, True])
def test_gradients_reach_every_used_parameter(legacy: bool) -> None:
    torch.manual_seed(0)
    ocbe, decoder = build_rd_student("resnet18", legacy_unused_conv4=legacy)
    feats = [torch.randn(2, 64, 16, 16), torch.randn(2, 128, 8, 8), torch.randn(2, 256, 4, 4)]
    out = decoder(ocbe(feats))
    sum(o.square().mean() for o in out).backward()
    no_grad = {n for n, p in ocbe.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    no_grad |= {n for n, p in decoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    if legacy:
        assert no_grad == {"conv4.weight", "bn4.weight", "bn4.bias"}
        assert all(p.grad is None for p in (*ocbe.conv4.parameters(), *ocbe.bn4.parameters()))
    else:
        assert no_grad == set()


def test_wrn_gradient_structure_meta() -> None:
    with torch.device("meta"):
        ocbe, decoder = build_rd_student("wide_resnet50_2", legacy_unused_conv4=True)
        feats = [
            torch.empty(2, 256, 64, 64),
            torch.empty(2, 512, 32, 32),
            torch.empty(2, 1024, 16, 16),
        ]
        sum(o.sum() for o in decoder(ocbe(feats))).backward()
    missing = {n for n, p in ocbe.named_parameters() if p.grad is None}
    missing |= {n for n, p in decoder.named_parameters() if p.grad is None}
    assert missing == {"conv4.weight", "bn4.weight", "bn4.bias"}


# ---------------------------------------------------------------------------------------------
# wiring against functional references
# ---------------------------------------------------------------------------------------------


def _cbr(x: torch.Tensor, conv_m: nn.Conv2d, bn_m: nn.BatchNorm2d, relu: bool = True) -> torch.Tensor:
    y = F.conv2d(x, conv_m.weight, stride=conv_m.stride, padding=conv_m.padding)
    y = F.batch_norm(y, bn_m.running_mean, bn_m.running_var, bn_m.weight, bn_m.bias, False, 0.0, bn_m.eps)
    return F.relu(y) if relu else y


def test_ocbe_mff_feeds_concat_without_fusion_conv() -> None:
    torch.manual_seed(0)
    ocbe, _ = build_rd_student("resnet18")
    ocbe.eval()
    for m in ocbe.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    f1, f2, f3 = torch.randn(2, 64, 16, 16), torch.randn(2, 128, 8, 8), torch.randn(2, 256, 4, 4)
    seen: list[torch.Tensor] = []
    ocbe.bn_layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        z = ocbe([f1, f2, f3])
        l1 = _cbr(_cbr(f1, ocbe.conv1, ocbe.bn1), ocbe.conv2, ocbe.bn2)
        l2 = _cbr(f2, ocbe.conv3, ocbe.bn3)
    assert seen[0].shape == (2, 768, 4, 4)
    torch.testing.assert_close(seen[0], torch.cat([l1, l2, f3], dim=1))
    assert z.shape == (2, 512, 2, 2)
    first = ocbe.bn_layer[0]
    assert first.conv1.stride == (2, 2) and first.conv1.kernel_size == (3, 3)  # basic: 3x3 s2 first
    assert first.downsample[0].kernel_size == (1, 1) and first.downsample[0].stride == (2, 2)
    assert first.downsample[0].in_channels == 768


def test_wrn_ocbe_first_block_layout() -> None:
    ocbe, _ = _meta_student("wide_resnet50_2")
    b = ocbe.oce[0]
    assert (b.conv1.in_channels, b.conv1.out_channels, b.conv1.kernel_size) == (3072, 1024, (1, 1))
    assert (b.conv2.out_channels, b.conv2.kernel_size, b.conv2.stride) == (1024, (3, 3), (2, 2))
    assert (b.conv3.out_channels, b.downsample[0].in_channels, b.downsample[0].stride) == (
        2048,
        3072,
        (2, 2),
    )
    assert len(ocbe.oce) == 3 and all(blk.downsample is None for blk in ocbe.oce[1:])


def test_decoder_up_block_matches_functional_reference() -> None:
    torch.manual_seed(0)
    _, decoder = build_rd_student("resnet50")
    block = decoder.layer3[0]
    assert isinstance(block, UpBottleneck)
    assert isinstance(block.conv2, nn.ConvTranspose2d) and block.conv2.bias is None
    assert block.conv2.kernel_size == (2, 2) and block.conv2.stride == (2, 2)
    assert isinstance(block.upsample[0], nn.ConvTranspose2d) and block.upsample[0].bias is None
    assert all(isinstance(b.conv2, nn.Conv2d) and b.conv2.kernel_size == (3, 3) for b in decoder.layer3[1:])
    assert [len(decoder.layer1), len(decoder.layer2), len(decoder.layer3)] == [3, 4, 6]
    block.eval()
    x = torch.randn(1, 512, 4, 4)

    def bn_eval(y: torch.Tensor, m: nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(y, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    with torch.no_grad():
        y = F.relu(bn_eval(F.conv2d(x, block.conv1.weight), block.bn1))
        y = F.relu(bn_eval(F.conv_transpose2d(y, block.conv2.weight, stride=2), block.bn2))
        y = bn_eval(F.conv2d(y, block.conv3.weight), block.bn3)
        short = bn_eval(F.conv_transpose2d(x, block.upsample[0].weight, stride=2), block.upsample[1])
        ref = F.relu(y + short)
        out = block(x)
    assert out.shape == (1, 256, 8, 8)
    torch.testing.assert_close(out, ref)


def test_decoder_returns_encoder_order() -> None:
    _, decoder = build_rd_student("resnet18")
    decoder.eval()
    z = torch.randn(1, 512, 2, 2)
    with torch.no_grad():
        c, b, a = decoder(z)
        a_ref = decoder.layer1(z)
        b_ref = decoder.layer2(a_ref)
        c_ref = decoder.layer3(b_ref)
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)
    torch.testing.assert_close(c, c_ref)
    assert (c.shape[1], b.shape[1], a.shape[1]) == (64, 128, 256)


# ---------------------------------------------------------------------------------------------
# init
# ---------------------------------------------------------------------------------------------


def test_init_kaiming_fan_out_for_conv2d_default_for_convtranspose() -> None:
    torch.manual_seed(0)
    ocbe, decoder = build_rd_student("resnet18", legacy_unused_conv4=True)
    n_conv = n_deconv = 0
    for module in (ocbe, decoder):
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight.detach().double()
                fan_out = w.shape[0] * w.shape[2] * w.shape[3]
                expected = math.sqrt(2.0 / fan_out)
                rel_tol = 6.0 / math.sqrt(2 * w.numel()) + 1e-3  # ~6 standard errors
                assert abs(w.std().item() / expected - 1) < rel_tol, (m, w.std().item(), expected)
                assert abs(w.mean().item()) < 6 * expected / math.sqrt(w.numel())
                n_conv += 1
            elif isinstance(m, nn.ConvTranspose2d):
                # PyTorch default: kaiming_uniform(a=sqrt(5)) -> U(-b, b), b = 1/sqrt(fan_in),
                # fan_in of a ConvTranspose2d weight [in, out, k, k] = out * k * k.
                w = m.weight.detach().double()
                bound = 1.0 / math.sqrt(w.shape[1] * w.shape[2] * w.shape[3])
                assert w.abs().max().item() <= bound + 1e-7
                assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
                n_deconv += 1
            elif isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert n_conv > 10 and n_deconv == 6  # 3 stages x (block deconv + shortcut deconv)


def test_unknown_backbone_is_kdad_error() -> None:
    with pytest.raises(KdadError, match="resnet18, resnet34, resnet50, wide_resnet50_2"):
        build_rd_student("timm:efficientnet_b0")
    with pytest.raises(KdadError):
        OneClassBottleneck("basic", [64, 128, 256], width_per_group=128)
