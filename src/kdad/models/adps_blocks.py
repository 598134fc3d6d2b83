"""Building blocks of ADPS (Asymmetric Distillation Post-Segmentation).

Xing, Tang, Tang, Li, "ADPS: Asymmetric Distillation Post-Segmentation for Image Anomaly
Detection", IEEE TNNLS 36(4), 2025 (arXiv 2210.10495); spec ``adps_tdad_dskd.md`` §2.

Provenance tags (spec §0): [S] stated in the paper, [I] inferred from it, [F] family convention
(DRAEM/DeSTSeg code), [R] *our reconstruction* where the paper is silent.

* :func:`split_patches` / :func:`stitch_patches`: the asymmetric input [S]. The image is cut into
  ``k x k`` non-overlapping patches that the student sees independently; its patch features are
  put back at their original positions. One batched forward: ``[B,C,H,W] -> [B*k*k,C,H/k,W/k]``
  with the patches of one image consecutive and in row-major order (patch ``j = r*k + c``).
* :class:`AsymmetricStudent`: the student backbone behind split/stitch. Splitting at the input
  is the paper's default [S]; splitting again after stage 1 / stage 2 (``split_stages``) is the
  paper's "asymmetric layers" ablation, whose exact form is *our reconstruction* [R]: nested
  re-splitting of the per-patch features into ``k x k`` sub-patches, stitched back in reverse
  order (innermost first).
* :func:`cosine_similarity_maps` and :func:`weight_mask_block`: the Weight Mask Block [S, Eqs.
  1-2], ``W_i = cos_c(T_i, S_i)`` per pixel and ``C_i = (1 - W_i) * T_i``.
* :class:`PostSegmentationModule`: U-Net up-blocks [S, Eqs. 3-5] and a 2-class softmax head at
  full resolution [S]; start tensor, number of blocks and widths are *our reconstruction* [R]
  (spec §2.3 table, derived from the teacher's channels).
* :func:`mask_aware_distillation_loss`: ``L_d`` [S, Eq. 7]; how the mask reaches feature
  resolution and the optional clamp of the negative term are *our reconstruction* [R].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdad.errors import KdadError
from kdad.losses import downsample_mask
from kdad.models.backbones import FeatureExtractor, TorchvisionResNetFeatures

__all__ = [
    "SPLIT_STAGES",
    "AsymmetricStudent",
    "PostSegmentationModule",
    "UpBlock",
    "check_split_size",
    "cosine_similarity_maps",
    "derived_psm_widths",
    "mask_aware_distillation_loss",
    "split_multiple",
    "split_patches",
    "stitch_patches",
    "weight_mask_block",
]

#: Where the student's input/features may be cut into ``k x k`` patches.
SPLIT_STAGES: tuple[str, ...] = ("input", "stage1", "stage2", "stage3")


# ----------------------------------------------------------------------------------------------
# split and stitch
# ----------------------------------------------------------------------------------------------


def split_patches(x: Tensor, k: int) -> Tensor:
    """Cut every map into ``k x k`` non-overlapping patches: ``[B,C,H,W] -> [B*k*k,C,H/k,W/k]``.

    Patch ``j = r*k + c`` of image ``b`` (row ``r``, column ``c``, row-major) is output
    ``b*k*k + j`` and equals ``x[b, :, r*H/k:(r+1)*H/k, c*W/k:(c+1)*W/k]``.
    """
    b, c, h, w = x.shape
    if h % k or w % k:
        raise KdadError(f"cannot split a {h}x{w} map into method.k={k} patches per side; use sizes divisible by k")
    ph, pw = h // k, w // k
    patches = x.reshape(b, c, k, ph, k, pw).permute(0, 2, 4, 1, 3, 5)  # [B,k_r,k_c,C,ph,pw]
    return patches.reshape(b * k * k, c, ph, pw)


def stitch_patches(x: Tensor, k: int) -> Tensor:
    """Inverse of :func:`split_patches`: ``[B*k*k,C,h,w] -> [B,C,k*h,k*w]`` (row-major)."""
    n, c, h, w = x.shape
    if n % (k * k):
        raise KdadError(f"cannot stitch {n} patch maps into images of method.k={k} x {k} patches")
    b = n // (k * k)
    image = x.reshape(b, k, k, c, h, w).permute(0, 3, 1, 4, 2, 5)  # [B,C,k_r,h,k_c,w]
    return image.reshape(b, c, k * h, k * w)


def split_multiple(k: int, num_splits: int, deepest_stride: int) -> int:
    """The image side must be a multiple of ``k**num_splits * deepest_stride``: then every patch
    (and every nested sub-patch) is cut exactly and each level's per-patch features tile the
    teacher's feature grid without padding effects at the borders' sizes."""
    return int(k) ** int(num_splits) * int(deepest_stride)


def check_split_size(height: int, width: int, k: int, num_splits: int, deepest_stride: int) -> None:
    """Raise a one-line :class:`KdadError` when stitched student features cannot have the
    teacher's shapes (``H/k`` must be a multiple of the deepest level's stride, 16 for layer3)."""
    multiple = split_multiple(k, num_splits, deepest_stride)
    if height % multiple == 0 and width % multiple == 0:
        return
    suggestion = max(multiple, round(max(height, width) / multiple) * multiple)
    nested = f" (k^{num_splits} for the split stages)" if num_splits > 1 else ""
    raise KdadError(
        f"ADPS student/teacher size mismatch: data.image_size={height}x{width} with method.k={k} gives patches whose "
        f"side is not a multiple of {deepest_stride} (the stride of the deepest feature level){nested}; "
        f"set data.image_size to a multiple of {multiple} (e.g. {suggestion}) or choose a smaller method.k"
    )


class AsymmetricStudent(nn.Module):
    """The student of ADPS: a backbone that only ever sees ``k x k`` patches of the image [S].

    ``forward(x)`` returns the stitched feature maps, one per level, with the same shapes as a
    whole-image forward of the same backbone (the teacher's shapes). All patches of a batch go
    through the backbone in one batched call (``B*k*k`` patches; BatchNorm sees all of them).

    ``split_stages`` (subset of :data:`SPLIT_STAGES`): ``input`` cuts the image (the paper's
    default [S]); ``stageN`` cuts the per-patch output of ``layerN`` once more into ``k x k``
    sub-patches before ``layerN+1`` -- *our reconstruction* of the paper's "asymmetric layers"
    ablation [R]. Every level's output is stitched back as many times as it was cut, innermost
    cut first. Stage splitting needs a torchvision ResNet (the stages must be reachable).
    """

    def __init__(self, backbone: FeatureExtractor, k: int, split_stages: Sequence[str] = ("input",)) -> None:
        super().__init__()
        self.backbone = backbone
        self.k = int(k)
        if self.k < 1:
            raise KdadError(f"method.k={k} must be a positive integer (8 in the paper, 1 = symmetric baseline)")
        stages = list(split_stages)
        bad = [s for s in stages if s not in SPLIT_STAGES]
        if bad or len(set(stages)) != len(stages):
            raise KdadError(f"method.split_stages={stages} is invalid; use distinct names out of {list(SPLIT_STAGES)}")
        self.split_stages = [s for s in SPLIT_STAGES if s in stages]  # canonical order
        stage_cuts = [s for s in self.split_stages if s != "input"]
        if stage_cuts:
            if not isinstance(backbone, TorchvisionResNetFeatures):
                raise KdadError(
                    f"method.split_stages={stages} cuts intermediate stages, "
                    "which needs a torchvision ResNet backbone, "
                    f"not {backbone.name}; use method.split_stages=[input]"
                )
            deepest = max(int(layer.removeprefix("layer")) for layer in backbone.layers)
            late = [s for s in stage_cuts if int(s.removeprefix("stage")) >= deepest]
            if late:
                raise KdadError(
                    f"method.split_stages={stages}: {late} come after the deepest feature level (layer{deepest}); "
                    f"use stages before it"
                )

    @property
    def channels(self) -> list[int]:
        return list(self.backbone.channels)

    @property
    def reductions(self) -> list[int]:
        return list(self.backbone.reductions)

    @property
    def num_splits(self) -> int:
        return len(self.split_stages)

    @property
    def input_multiple(self) -> int:
        return split_multiple(self.k, self.num_splits, max(self.reductions))

    def _cut(self, x: Tensor, depth: int) -> tuple[Tensor, int]:
        return split_patches(x, self.k), depth + 1

    def _stitch(self, x: Tensor, depth: int) -> Tensor:
        for _ in range(depth):  # innermost cut first (reverse order of the cuts)
            x = stitch_patches(x, self.k)
        return x

    def forward(self, x: Tensor) -> list[Tensor]:
        check_split_size(x.shape[-2], x.shape[-1], self.k, self.num_splits, max(self.reductions))
        depth = 0
        if "input" in self.split_stages:
            x, depth = self._cut(x, depth)  # [B*k*k,3,H/k,W/k]
        if self.num_splits == depth:  # input split only: any FeatureExtractor
            return [self._stitch(f, depth) for f in self.backbone(x)]
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        outputs: dict[str, Tensor] = {}
        deepest = max(int(layer.removeprefix("layer")) for layer in net.layers)
        for index in range(1, deepest + 1):
            x = getattr(net, f"layer{index}")(x)
            outputs[f"layer{index}"] = self._stitch(x, depth)
            if f"stage{index}" in self.split_stages and index < deepest:
                x, depth = self._cut(x, depth)  # [N*k*k,C,h/k,w/k]
        return [outputs[layer] for layer in net.layers]


# ----------------------------------------------------------------------------------------------
# Weight Mask Block
# ----------------------------------------------------------------------------------------------


def cosine_similarity_maps(teacher: Sequence[Tensor], student: Sequence[Tensor]) -> list[Tensor]:
    """``W_i[x,y] = <T_i, S_i> / (|T_i| |S_i|)`` over channels [S, Eq. 1]: ``[B,1,h_i,w_i]`` float32."""
    if len(teacher) != len(student):
        raise ValueError(f"got {len(teacher)} teacher and {len(student)} student feature levels")
    maps = []
    for t, s in zip(teacher, student, strict=True):
        if t.shape != s.shape:
            raise KdadError(
                f"ADPS teacher features {tuple(t.shape)} and stitched student features {tuple(s.shape)} differ; "
                "check data.image_size and method.k"
            )
        with torch.autocast(device_type=t.device.type, enabled=False):
            maps.append(F.cosine_similarity(t.float(), s.float(), dim=1, eps=1e-8).unsqueeze(1))
    return maps


def weight_mask_block(teacher: Sequence[Tensor], similarity: Sequence[Tensor], detach: bool = False) -> list[Tensor]:
    """``C_i = (1 - W_i) * T_i`` [S, Eq. 2]: the teacher's features weighted by the coarse anomaly
    mask ``1 - W_i`` (broadcast over channels; ``C_i`` has ``T_i``'s shape, float32).

    ``detach=True`` stops the segmentation loss from reaching the student through ``W_i`` (an
    ablation flag, *our reconstruction* [R]; the paper trains everything with ``L_d + lambda L_s``,
    so by default the gradient flows).
    """
    weighted = []
    for t, w in zip(teacher, similarity, strict=True):
        weight = 1.0 - (w.detach() if detach else w)  # [B,1,h,w]
        weighted.append(weight * t.float())  # [B,C,h,w]
    return weighted


# ----------------------------------------------------------------------------------------------
# Post-Segmentation Module
# ----------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UpBlock(nn.Module):
    """One U-Net up-block [S, Eqs. 3-5]: ``P^m = TrConv(P)`` (2x2, stride 2), ``P^c = cat(P^m, C)``,
    ``P = ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(P^c))))))``. ``skip_channels=0``: no skip (then
    ``P^c = P^m``; used by the blocks that go below the shallowest feature level [R])."""

    def __init__(self, in_channels: int, out_channels: int, skip_channels: int = 0) -> None:
        super().__init__()
        self.skip_channels = int(skip_channels)
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            _conv_bn_relu(out_channels + self.skip_channels, out_channels),
            _conv_bn_relu(out_channels, out_channels),
        )

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        x = self.up(x)  # [B,out,2h,2w]
        if self.skip_channels:
            if skip is None or skip.shape[-2:] != x.shape[-2:]:
                got = None if skip is None else tuple(skip.shape)
                raise ValueError(f"UpBlock expects a skip map of size {tuple(x.shape[-2:])}, got {got}")
            x = torch.cat([x, skip.to(x.dtype)], dim=1)  # [B,out+skip,2h,2w]
        return self.conv(x)


def _upsampling_steps(reductions: Sequence[int]) -> int:
    """Number of 2x steps from the shallowest level to full resolution (2 for stride 4); the
    levels must be consecutive 2x apart (ResNet layer1..3: 4, 8, 16)."""
    first = int(reductions[0])
    steps = round(math.log2(first)) if first > 0 else -1
    consecutive = all(int(b) == 2 * int(a) for a, b in pairwise(reductions))
    if steps < 0 or 2**steps != first or not consecutive:
        raise KdadError(
            f"the ADPS post-segmentation module needs feature levels 2x apart with power-of-two strides, got strides "
            f"{list(reductions)}; use backbone.layers like [layer1, layer2, layer3]"
        )
    return steps


def derived_psm_widths(channels: Sequence[int], reductions: Sequence[int]) -> list[int]:
    """PSM widths derived from the teacher (*our reconstruction* [R], spec §2.3 table): one
    up-block per skip level with that level's channels (deepest first, ``c_{n-1} .. c_1``), then
    halving widths down to full resolution. WRN50 ``[256,512,1024]`` -> ``[512,256,128,64]``;
    resnet18 ``[64,128,256]`` -> ``[128,64,32,16]`` (the 1/4 scaling of the spec)."""
    widths = [int(c) for c in reversed(list(channels)[:-1])]
    width = int(channels[0])
    for _ in range(_upsampling_steps(reductions)):
        width = max(1, width // 2)
        widths.append(width)
    return widths


class PostSegmentationModule(nn.Module):
    """PSM: ``[C_1..C_n]`` (shallow to deep) -> ``M``, 2-class softmax probabilities ``[B,2,H,W]``.

    Stated [S]: U-Net up-blocks with 2x transposed convolutions, skip concatenation with
    ``C_i``, two conv3x3+BN+ReLU per block, and ``M = Softmax(Conv3x3(P_n))`` at image size.
    *Our reconstruction* [R]: ``P_0 = C_n`` (the deepest level), one up-block per shallower level
    (skip ``C_i``), then up-blocks without skip until full resolution, widths from
    :func:`derived_psm_widths` unless ``widths`` is given (WRN50: 1024@16 -> 512@32 -> 256@64
    -> 128@128 -> 64@256 -> 2@256, about 12 M parameters).
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        widths: Sequence[int] | None = None,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        expected = len(channels) - 1 + _upsampling_steps(reductions)
        widths = derived_psm_widths(channels, reductions) if widths is None else [int(w) for w in widths]
        if len(widths) != expected or any(w < 1 for w in widths):
            raise KdadError(
                f"method.psm_widths={list(widths)} must list {expected} positive widths "
                f"for {len(channels)} feature levels "
                f"(e.g. {derived_psm_widths(channels, reductions)}), or be null to derive them from the teacher"
            )
        self.widths = widths
        skips = list(reversed(channels[:-1])) + [0] * (expected - len(channels) + 1)
        blocks = []
        previous = channels[-1]
        for width, skip in zip(widths, skips, strict=True):
            blocks.append(UpBlock(previous, width, skip))
            previous = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(previous, num_classes, kernel_size=3, padding=1)

    def forward(self, weighted: Sequence[Tensor]) -> Tensor:
        levels = list(weighted)
        x = levels[-1]  # P_0 = C_n
        skips = list(reversed(levels[:-1]))
        for index, block in enumerate(self.blocks):
            x = block(x, skips[index] if index < len(skips) else None)
        logits = self.head(x)  # [B,2,H,W]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return torch.softmax(logits.float(), dim=1)


# ----------------------------------------------------------------------------------------------
# mask-aware distillation loss
# ----------------------------------------------------------------------------------------------


def mask_aware_distillation_loss(
    similarity: Sequence[Tensor],
    mask: Tensor,
    mask_down: str = "bilinear_threshold",
    clamp_neg: bool = False,
) -> Tensor:
    """``L_d = sum_i mean_{b,x,y} [(1 - Y_i)(1 - W_i) + Y_i W_i]`` [S, Eq. 7] (float32).

    Teacher and student are pulled together on normal pixels (``W -> 1``) and pushed apart on
    anomalous ones (``W -> -1`` in the literal form). ``Y_i`` is the synthetic-anomaly mask at
    level ``i``'s resolution via :func:`kdad.losses.downsample_mask` (``mask_down``:
    ``bilinear_threshold``, the DeSTSeg convention, or ``max_pool``; *our reconstruction* [R]).
    ``clamp_neg=True`` uses ``Y_i max(W_i, 0)`` instead, so the anomalous term stops at
    orthogonal features (*our reconstruction* [R]; default off = the paper's form).
    """
    loss = torch.zeros((), device=mask.device)
    for w in similarity:
        w = w.float()
        y = downsample_mask(mask.float(), w.shape[-2:], mask_down)  # [B,1,h,w] in {0,1}
        pushed = w.clamp_min(0.0) if clamp_neg else w
        loss = loss + ((1.0 - y) * (1.0 - w) + y * pushed).mean()
    return loss
