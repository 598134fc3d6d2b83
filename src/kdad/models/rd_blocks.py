"""Reverse Distillation building blocks: the one-class bottleneck (OCBE) and the ResNet decoder.

Faithful to the official RD code (``hq-deng/RD4AD``: ``resnet.py::BN_layer`` and
``de_resnet.py``), which URD and RD++ re-use unchanged (spec ``rd_urd.md`` §1.2-1.3).

Module and parameter names follow the official code (``conv1``..``bn3``, ``bn_layer``,
``conv4``/``bn4``; decoder ``layer1``..``layer3`` with ``upsample`` shortcuts), so state dicts
of the official checkpoints map one to one (``bn.*`` -> OneClassBottleneck, ``decoder.*`` ->
ResNetDecoder; with ``legacy_unused_conv4=True`` for the OCBE).

Shapes for ``wide_resnet50_2`` at 256x256 input::

    encoder      [256@64, 512@32, 1024@16]
    OCBE         MFF: f1 -> 1024@16, f2 -> 1024@16, f3 as is -> concat 3072@16
                 OCE: layer4-like stage (3 bottlenecks, width 1024) -> 2048@8
    decoder      layer1: 2048@8 -> 1024@16 (3 blocks), layer2: -> 512@32 (4), layer3: -> 256@64 (6)
                 returns [256@64, 512@32, 1024@16] (encoder order)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from kdad.errors import KdadError

__all__ = [
    "RD_STUDENT_CONFIGS",
    "OneClassBottleneck",
    "RDStudentConfig",
    "ResNetDecoder",
    "UpBasicBlock",
    "UpBottleneck",
    "build_rd_student",
    "rd_init",
    "resnet_stage",
]

_EXPANSION = {"basic": 1, "bottleneck": 4}

M = TypeVar("M", bound=nn.Module)


def _check_block(block: str, width_per_group: int) -> int:
    if block not in _EXPANSION:
        raise KdadError(f"unknown RD block type '{block}'; use 'basic' or 'bottleneck'")
    if block == "basic" and width_per_group != 64:
        raise KdadError(f"RD basic blocks need width_per_group=64, got {width_per_group}")
    return _EXPANSION[block]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


def _deconv2x2(cin: int, cout: int) -> nn.ConvTranspose2d:
    """2x2 transposed conv, stride 2 (doubles h, w): the decoder's stand-in for a strided conv."""
    return nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2, bias=False)


def rd_init(module: M) -> M:
    """Official RD init, in place: kaiming_normal_(fan_out, relu) for every ``nn.Conv2d``;
    BN 1 / 0. Returns ``module``.

    ``nn.ConvTranspose2d`` is not an ``nn.Conv2d`` subclass, so it keeps PyTorch's default init.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)
    return module


def resnet_stage(
    block: str, in_channels: int, out_channels: int, num_blocks: int, width_per_group: int = 64
) -> nn.Sequential:
    """A stride-2 ResNet stage of torchvision blocks (``basic`` or ``bottleneck``), as RD's OCE:
    the first block takes ``in_channels`` with a stride-2 3x3 conv and a 1x1 stride-2 conv + BN
    shortcut; the others keep ``out_channels``. Callers initialise it (:func:`rd_init`)."""
    expansion = _EXPANSION[block]
    block_cls = BasicBlock if block == "basic" else Bottleneck
    planes = out_channels // expansion
    shortcut = nn.Sequential(_conv1x1(in_channels, out_channels, stride=2), nn.BatchNorm2d(out_channels))
    blocks: list[nn.Module] = [
        block_cls(in_channels, planes, stride=2, downsample=shortcut, base_width=width_per_group)
    ]
    blocks += [block_cls(out_channels, planes, base_width=width_per_group) for _ in range(1, num_blocks)]
    return nn.Sequential(*blocks)


class OneClassBottleneck(nn.Module):
    """RD's OCBE = multi-scale feature fusion (MFF) + one-class embedding (OCE).

    With encoder channels ``[C1, C2, C3]`` (``[256, 512, 1024]`` for WRN50-2) and the block's
    expansion ``e`` (1 basic, 4 bottleneck):

    * MFF: ``f1`` -> 3x3 conv C1->C2 stride 2 (``conv1``/``bn1``) -> ReLU -> 3x3 conv C2->C3
      stride 2 (``conv2``/``bn2``) -> ReLU; ``f2`` -> 3x3 conv C2->C3 stride 2 (``conv3``/``bn3``)
      -> ReLU; ``f3`` unchanged; concatenated to ``3*C3`` channels. No 1x1 fusion conv.
    * OCE (``bn_layer``): a ResNet "layer4"-like stage of ``num_blocks`` encoder blocks with
      ``planes = 2*C3/e`` (output ``2*C3`` channels). Its first block takes the ``3*C3``
      concatenation, has a stride-2 3x3 conv and a 1x1 stride-2 conv + BN shortcut.
    * ``conv4``/``bn4`` (1x1 ``4*C3 -> 2*C3`` + BN) exist in the official code but are never
      used; they are built only with ``legacy_unused_conv4=True`` (checkpoint / parameter-count
      parity) and never enter ``forward``.

    Init: kaiming_normal_(fan_out, relu) for every Conv2d, BN weight 1 / bias 0.
    """

    def __init__(
        self,
        block: str,
        in_channels: Sequence[int],
        num_blocks: int = 3,
        width_per_group: int = 64,
        legacy_unused_conv4: bool = False,
    ) -> None:
        super().__init__()
        expansion = _check_block(block, width_per_group)
        if len(in_channels) != 3:
            raise KdadError(f"OneClassBottleneck needs 3 encoder levels, got in_channels={list(in_channels)}")
        c1, c2, c3 = (int(c) for c in in_channels)
        if (2 * c3) % expansion:
            raise KdadError(f"OCBE output 2*{c3} channels is not divisible by the {block} expansion {expansion}")
        self.block = block
        self.in_channels = [c1, c2, c3]
        self.out_channels = 2 * c3
        self.legacy_unused_conv4 = legacy_unused_conv4

        # MFF: f1 path (two stride-2 3x3 convs) and f2 path (one), names as in the official code.
        self.conv1 = _conv3x3(c1, c2, stride=2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.conv2 = _conv3x3(c2, c3, stride=2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = _conv3x3(c2, c3, stride=2)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)

        # OCE: layer4-like stage on the 3*C3 concatenation.
        self.bn_layer = resnet_stage(block, 3 * c3, 2 * c3, num_blocks, width_per_group)

        if legacy_unused_conv4:  # dead in the official code: registered, never used
            self.conv4 = _conv1x1(4 * c3, 2 * c3)
            self.bn4 = nn.BatchNorm2d(2 * c3)

        rd_init(self)

    @property
    def mff_modules(self) -> list[nn.Module]:
        """The MFF layers (f1 and f2 paths)."""
        return [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3]

    @property
    def oce(self) -> nn.Sequential:
        """The OCE stage (official name ``bn_layer``)."""
        return self.bn_layer

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        f1, f2, f3 = feats
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(f1))))))  # [B,C3,h3,w3]
        l2 = self.relu(self.bn3(self.conv3(f2)))  # [B,C3,h3,w3]
        fused = torch.cat([l1, l2, f3], dim=1)  # [B,3*C3,h3,w3]
        return self.bn_layer(fused).contiguous()  # [B,2*C3,h3/2,w3/2]


class UpBasicBlock(nn.Module):
    """Decoder basic block. With ``stride=2`` the first 3x3 conv is a 2x2 stride-2 transposed conv
    (official ``de_resnet.BasicBlock``); the second conv is always 3x3."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        upsample: nn.Module | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        self.conv1 = _deconv2x2(inplanes, planes) if stride == 2 else _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.upsample = upsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class UpBottleneck(nn.Module):
    """Decoder bottleneck: 1x1 -> (2x2 stride-2 transposed conv if ``stride=2`` else 3x3) -> 1x1,
    expansion 4, width ``planes * base_width / 64`` (official ``de_resnet.Bottleneck``)."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        upsample: nn.Module | None = None,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _deconv2x2(width, width) if stride == 2 else _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = upsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetDecoder(nn.Module):
    """RD's student decoder (official ``de_resnet``): three "up" ResNet stages.

    Input: the OCBE output, ``8*base_planes*e`` channels (2048@8 for WRN50-2 at 256 input).
    Stages ``layer1``/``layer2``/``layer3`` have ``planes = 4/2/1 * base_planes`` and
    ``layers[0..2]`` blocks (``[3, 4, 6]`` for resnet50/WRN50-2/resnet34 - not mirrored, so the
    stage producing the encoder-layer1 target is the last and longest one; ``[2, 2, 2]`` for
    resnet18). The first block of every stage doubles the resolution with a 2x2 stride-2
    transposed conv in place of the strided conv, and its shortcut is
    ``ConvTranspose2d(in, out, 2, stride 2, no bias) + BN`` (module name ``upsample``).

    ``forward`` returns ``[layer3_out, layer2_out, layer1_out]``, i.e. the encoder's order
    (``[256@64, 512@32, 1024@16]`` for WRN50-2).

    Init: kaiming_normal_(fan_out, relu) for nn.Conv2d only; ConvTranspose2d keeps PyTorch's
    default init; BN weight 1, bias 0.
    """

    def __init__(self, block: str, layers: Sequence[int], width_per_group: int = 64, base_planes: int = 64) -> None:
        super().__init__()
        expansion = _check_block(block, width_per_group)
        if len(layers) != 3:
            raise KdadError(f"ResNetDecoder needs 3 stage block counts, got layers={list(layers)}")
        self.block = block
        self.base_width = width_per_group
        self._block_cls = UpBasicBlock if block == "basic" else UpBottleneck
        self.inplanes = 8 * base_planes * expansion
        self.in_channels = self.inplanes
        self.layer1 = self._make_stage(4 * base_planes, int(layers[0]))
        self.layer2 = self._make_stage(2 * base_planes, int(layers[1]))
        self.layer3 = self._make_stage(1 * base_planes, int(layers[2]))
        self.out_channels = [base_planes * expansion * k for k in (1, 2, 4)]  # encoder order
        rd_init(self)

    def _make_stage(self, planes: int, blocks: int) -> nn.Sequential:
        out = planes * self._block_cls.expansion
        upsample = nn.Sequential(_deconv2x2(self.inplanes, out), nn.BatchNorm2d(out))
        stage: list[nn.Module] = [
            self._block_cls(self.inplanes, planes, stride=2, upsample=upsample, base_width=self.base_width)
        ]
        self.inplanes = out
        stage.extend(self._block_cls(out, planes, base_width=self.base_width) for _ in range(1, blocks))
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> list[Tensor]:
        a = self.layer1(x)  # deepest target (encoder layer3), e.g. 1024@16
        b = self.layer2(a)  # encoder layer2, e.g. 512@32
        c = self.layer3(b)  # encoder layer1, e.g. 256@64
        return [c, b, a]


@dataclass(frozen=True)
class RDStudentConfig:
    """OCBE + decoder layout of the official ``bn()`` / ``de_*`` constructors for one encoder."""

    block: str
    encoder_channels: tuple[int, int, int]
    ocbe_blocks: int
    decoder_layers: tuple[int, int, int]
    width_per_group: int


#: Official pairs: resnet18 -> BN_layer(AttnBasicBlock, 2) + de_resnet18; resnet34 ->
#: BN_layer(AttnBasicBlock, 3) + de_resnet34; resnet50 -> BN_layer(AttnBottleneck, 3) +
#: de_resnet50; wide_resnet50_2 -> BN_layer(AttnBottleneck, 3, width 128) + de_wide_resnet50_2.
RD_STUDENT_CONFIGS: dict[str, RDStudentConfig] = {
    "resnet18": RDStudentConfig("basic", (64, 128, 256), 2, (2, 2, 2), 64),
    "resnet34": RDStudentConfig("basic", (64, 128, 256), 3, (3, 4, 6), 64),
    "resnet50": RDStudentConfig("bottleneck", (256, 512, 1024), 3, (3, 4, 6), 64),
    "wide_resnet50_2": RDStudentConfig("bottleneck", (256, 512, 1024), 3, (3, 4, 6), 128),
}


def build_rd_student(backbone: str, legacy_unused_conv4: bool = False) -> tuple[OneClassBottleneck, ResNetDecoder]:
    """OCBE and decoder matching the official RD pairing for ``backbone``."""
    cfg = RD_STUDENT_CONFIGS.get(backbone)
    if cfg is None:
        raise KdadError(f"no RD student layout for backbone '{backbone}'; use one of {', '.join(RD_STUDENT_CONFIGS)}")
    ocbe = OneClassBottleneck(
        cfg.block,
        cfg.encoder_channels,
        num_blocks=cfg.ocbe_blocks,
        width_per_group=cfg.width_per_group,
        legacy_unused_conv4=legacy_unused_conv4,
    )
    base_planes = cfg.encoder_channels[0] // _EXPANSION[cfg.block]
    decoder = ResNetDecoder(cfg.block, cfg.decoder_layers, width_per_group=cfg.width_per_group, base_planes=base_planes)
    return ocbe, decoder
