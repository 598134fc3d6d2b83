"""A DeSTSeg-style encoder-decoder student (TDAD's ``student: destseg`` option).

DeSTSeg (Zhang et al., CVPR 2023, ``apple/ml-destseg`` ``model/destseg.py::StudentNet``) trains a
*denoising* student on the image itself instead of on the teacher's features: a randomly
initialised ResNet-18 encoder (stem + layer1..layer4) followed by a decoder without skip
connections that reconstructs the teacher's layer1..layer3 features. Having no skips is the
point: the decoder can only reproduce what the 1/32 bottleneck encodes, so it cannot copy
anomalous input detail through to its outputs.

What :class:`DeSTSegStudent` builds (written for kdad from that description; TDAD's use of it
is **our reconstruction**, the TDAD paper's abstract does not describe its student):

* encoder: torchvision ResNet-18 layout, random init (torchvision's own init), stem +
  ``layer1..layer4`` -> ``[64@H/4, 128@H/8, 256@H/16, 512@H/32]``; only ``layer4`` feeds the
  decoder, the other levels give the target sizes;
* decoder: four stages of two torchvision ``BasicBlock``\\ s each (stride 1; a 1x1 conv + BN
  projection on the first block's shortcut when the width changes):

  ``stage4``: 512 -> 512 at H/32; bilinear resize (``align_corners=False``) to H/16;
  ``stage3``: 512 -> C3 at H/16; resize to H/8;
  ``stage2``: C3 -> C2 at H/8; resize to H/4;
  ``stage1``: C2 -> C1 at H/4;

  where ``[C1, C2, C3]`` are the teacher's layer1..3 widths (``[64, 128, 256]`` for a
  ResNet-18 teacher, which gives exactly DeSTSeg's widths; ``[256, 512, 1024]`` for WRN50-2);
* decoder init: kaiming_normal_(fan_out, relu) for convs, BN weight 1 / bias 0 (as DeSTSeg);
* ``forward(x)`` returns ``[stage1, stage2, stage3]`` outputs, i.e. the teacher's order and
  shapes ``[C1@H/4, C2@H/8, C3@H/16]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from kdad.errors import KdadError
from kdad.models.backbones import build_backbone
from kdad.models.rd_blocks import rd_init

__all__ = ["DeSTSegStudent"]

_ENCODER = "resnet18"
_ENCODER_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def _stage(in_channels: int, out_channels: int, blocks: int = 2) -> nn.Sequential:
    """``blocks`` stride-1 BasicBlocks; the first projects ``in -> out`` on its shortcut."""
    shortcut = None
    if in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.BatchNorm2d(out_channels)
        )
    layers: list[nn.Module] = [BasicBlock(in_channels, out_channels, downsample=shortcut)]
    layers += [BasicBlock(out_channels, out_channels) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class DeSTSegStudent(nn.Module):
    """Image -> trainable ResNet-18 encoder -> skip-free decoder -> features at the teacher's
    layer1..3 shapes (see the module docstring for the exact layout).

    Args:
        teacher_channels: the teacher's layer1..3 widths ``[C1, C2, C3]``.
    """

    def __init__(self, teacher_channels: Sequence[int]) -> None:
        super().__init__()
        if len(teacher_channels) != 3:
            raise KdadError(
                f"the destseg student needs 3 teacher levels (layer1..3), got channels {list(teacher_channels)}"
            )
        c1, c2, c3 = (int(c) for c in teacher_channels)
        self.out_channels = [c1, c2, c3]
        self.encoder = build_backbone(_ENCODER, "none", _ENCODER_LAYERS)  # trainable, random init
        width4 = self.encoder.channels[-1]  # 512
        self.stage4 = _stage(width4, width4)
        self.stage3 = _stage(width4, c3)
        self.stage2 = _stage(c3, c2)
        self.stage1 = _stage(c2, c1)
        for module in (self.stage4, self.stage3, self.stage2, self.stage1):
            rd_init(module)  # kaiming_normal_(fan_out, relu), BN 1 / 0

    @staticmethod
    def _resize(x: Tensor, like: Tensor) -> Tensor:
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        e1, e2, e3, e4 = self.encoder(x)  # [64@H/4, 128@H/8, 256@H/16, 512@H/32]
        b4 = self.stage4(e4)  # [B,512,H/32,W/32]
        b3 = self.stage3(self._resize(b4, e3))  # [B,C3,H/16,W/16]
        b2 = self.stage2(self._resize(b3, e2))  # [B,C2,H/8,W/8]
        b1 = self.stage1(self._resize(b2, e1))  # [B,C1,H/4,W/4]
        return [b1, b2, b3]
