"""URD's student: RD's bottleneck and decoder plus the teacher-feature injection (skip) modules.

From "Unlocking the Potential of Reverse Distillation for Anomaly Detection" (Liu et al., AAAI
2025, arXiv 2412.07579), behaviour of the official code ``hito2448/URD`` (``models/student.py``;
spec ``rd_urd.md`` §3.2). The OCBE and decoder are RD's, unchanged
(:mod:`kdad.models.rd_blocks`). The injection modules, for encoder channels ``[C1, C2, C3]``
(``[256, 512, 1024]`` for WRN50-2), index ``i`` feeding the decoder stage at level ``i+1``::

    conv1x1_downsample_dim[i]  bilinear x0.5 -> 1x1 conv C_i -> C_{i+1} -> BN -> ReLU
    fuse_encoder[i]            3x3 conv C_{i+1} -> C_{i+1} -> BN -> ReLU
    fuse_skip[i]               3x3 conv 2*C_{i+1} -> C_{i+1} -> BN -> ReLU
    conv3x3_simattn[i]         3x3 conv C_{i+1} -> C_{i+1} -> BN -> ReLU   (guided variant only)

Two variants (spec §3.2.4, §6.1):

* ``plain`` - what the released ``train.py`` runs (``forward_decoder_wogii``): teacher detail is
  injected without a gate. Default.
* ``guided`` - the similarity-gated "Guided Information Injection" (``forward_decoder_gii``):
  where the student's current reconstruction agrees with the teacher (per-pixel cosine ``g``,
  no grad, in [-1, 1]) the teacher's detail is passed on, elsewhere the student's own feature.

Init (official ``Student.apply(init_weight)``): ``xavier_normal_`` for every ``nn.Conv2d`` of the
student (OCBE and decoder included, overriding RD's kaiming init); ConvTranspose2d keeps
PyTorch's default; BN weight 1, bias 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.errors import check_choice
from kdad.models.rd_blocks import build_rd_student

INJECTION_MODES = ("plain", "guided")


def _conv_bn_relu(cin: int, cout: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class DownsampleProject(nn.Module):
    """Bilinear downsampling to the next level's size (x0.5, ``align_corners=False``; for an
    exact factor 2 this is 2x2 average pooling) followed by 1x1 conv + BN + ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.project = _conv_bn_relu(cin, cout, kernel_size=1)

    def forward(self, x: Tensor, size: Sequence[int]) -> Tensor:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return self.project(x)


class URDStudent(nn.Module):
    """OCBE (``bn``) -> decoder, with teacher features injected before decoder stages 2 and 3.

    ``forward(teacher_features)`` takes the teacher pyramid ``[T1, T2, T3]`` and returns the
    reconstruction in the same order, ``[c, b, a]`` (``[256@64, 512@32, 1024@16]`` for WRN50-2
    at 256 px).

    Args:
        backbone: encoder name (selects RD's OCBE/decoder layout).
        injection: ``plain`` (released code, default) or ``guided`` (gated GII).
        legacy_unused_modules: also build the official model's unused parameters - OCBE
            ``conv4``/``bn4`` and, in ``plain`` mode, ``conv3x3_simattn`` - so the registered
            parameter count (140,048,896 for WRN50-2) and state-dict keys match the official
            ``Student``. They never receive gradients.
    """

    def __init__(self, backbone: str, injection: str = "plain", legacy_unused_modules: bool = False) -> None:
        super().__init__()
        check_choice("method.injection", injection, INJECTION_MODES)
        self.injection = injection
        self.bn, self.decoder = build_rd_student(backbone, legacy_unused_conv4=legacy_unused_modules)
        dims = list(self.bn.in_channels)  # [C1, C2, C3]
        self.conv1x1_downsample_dim = nn.ModuleList(DownsampleProject(dims[i], dims[i + 1]) for i in range(2))
        self.fuse_encoder = nn.ModuleList(_conv_bn_relu(dims[i + 1], dims[i + 1], 3) for i in range(2))
        self.fuse_skip = nn.ModuleList(_conv_bn_relu(2 * dims[i + 1], dims[i + 1], 3) for i in range(2))
        if injection == "guided" or legacy_unused_modules:
            self.conv3x3_simattn = nn.ModuleList(_conv_bn_relu(dims[i + 1], dims[i + 1], 3) for i in range(2))
        self.apply(_xavier_init)

    def _inject(self, i: int, student: Tensor, upper: Tensor, lower: Tensor) -> Tensor:
        """Input of the next decoder stage at level ``i+1``: the student's feature there fused
        with the teacher's same-level feature plus the projected finer one."""
        injected = self.fuse_encoder[i](upper + self.conv1x1_downsample_dim[i](lower, upper.shape[-2:]))
        if self.injection == "guided":
            with torch.no_grad():  # the gate: agreement of the student's reconstruction and T
                gate = F.cosine_similarity(student.detach().float(), upper.float(), dim=1).unsqueeze(1)
            gate = gate.to(student.dtype)
            injected = self.conv3x3_simattn[i](injected * gate + student * (1.0 - gate))
        return self.fuse_skip[i](torch.cat([student, injected], dim=1))

    def forward(self, teacher: Sequence[Tensor]) -> list[Tensor]:
        t1, t2, t3 = teacher
        z = self.bn([t1, t2, t3])  # [B,2*C3,h3/2,w3/2]
        a = self.decoder.layer1(z)  # level-3 reconstruction, C3@h3
        b = self.decoder.layer2(self._inject(1, a, t3, t2))  # C2@h2
        c = self.decoder.layer3(self._inject(0, b, t2, t1))  # C1@h1
        return [c, b, a]


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):  # ConvTranspose2d is not a Conv2d: default init
        nn.init.xavier_normal_(module.weight)
