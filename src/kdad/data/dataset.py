"""An in-memory dataset that decodes every image exactly once.

Preprocessing follows the official RD code (``specs/rd_urd.md`` §2.6): PIL
``convert("RGB")`` (greyscale becomes three channels), ``Resize((H, W))`` with PIL bilinear
(antialiased when shrinking, as torchvision's PIL path does), no crop, no augmentation.
Images are stored un-normalised as one ``uint8 [N,3,H,W]`` tensor; methods normalise on the
device.

Masks: any non-zero pixel is a defect (MVTec's 0/255 and VisA's 1/3/... alike). With
``mask_resolution="input"`` the binary mask is resized bilinearly as float and binarised at
``> 0.5`` (RD: ``Resize`` on the GT, then ``> 0.5``), stored as ``uint8 [N,1,H,W]``. With
``mask_resolution="native"`` masks keep their file's size (a list of ``uint8 [1,h,w]``).
Normal images get all-zero masks. An anomalous sample whose mask is unknown
(``Sample.mask_path is None``) is stored as zeros with ``mask_known[i] = False``; in a
:class:`~kdad.data.batch.Batch` its mask is filled with :data:`MASK_UNKNOWN` (``-1.0``) so it
can never pass for a real mask.

Bad inputs (``docs/reliability.md``): a file that cannot be decoded (random bytes, truncated,
corrupt, a 32-bit integer/float image) or a mask whose size differs from its image raises a
one-line :class:`~kdad.errors.KdadError` naming the file. 16-bit grey images keep their top
byte (as PIL does for 16-bit RGB PNGs); alpha is dropped. Masks count any non-zero value as a
defect (grey values, palette indices, any RGB band). An anomalous image whose mask has no
defect pixel keeps label 1 (its folder says defective) and a warning is logged, as for masks
that lose their defect when resized and masks that are defect everywhere.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from kdad.data.batch import Batch
from kdad.data.readers import Sample
from kdad.errors import KdadError

log = logging.getLogger(__name__)

#: Value that fills a Batch mask whose ground truth is unknown.
MASK_UNKNOWN = -1.0

_MASK_RESOLUTIONS = ("input", "native")


def as_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``256`` -> ``(256, 256)``; ``[H, W]`` -> ``(H, W)``."""
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
    if len(size) != 2 or min(size) <= 0:
        raise KdadError(f"invalid data.image_size={image_size!r}; use one positive int or [height, width]")
    return size  # type: ignore[return-value]


def _open_image(path: Any, what: str) -> Image.Image:
    """Open and fully decode an image file, or raise a one-line KdadError.

    Any failure of the decoder (truncated or corrupt data, an unknown format, a header that
    claims an absurd size) is a problem of the file, whatever exception PIL's plugin raises.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now: corrupt data fails here, inside this try
            return img
    except FileNotFoundError as err:
        raise KdadError(f"{what} {path} does not exist; restore the file or fix data.root") from err
    except Exception as err:  # PIL's plugins raise many types for bad files
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise KdadError(
            f"cannot read {what} {path} ({type(err).__name__}: {reason}); replace or delete the corrupt file"
        ) from err


#: PIL modes with 8 bits per band that ``convert("RGB")`` maps faithfully (alpha is dropped).
_EIGHT_BIT_MODES = frozenset(
    {"1", "L", "P", "LA", "La", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
)


def _is_16_bit(mode: str) -> bool:
    return mode.startswith("I;16")


def _unsupported(path: Any, what: str, mode: str) -> KdadError:
    return KdadError(
        f"{what} {path} has pixel format '{mode}' (e.g. 32-bit integer or float), which kdad "
        "does not read; save it as an 8- or 16-bit PNG"
    )


def to_rgb(img: Image.Image, path: Any = "?", what: str = "image") -> Image.Image:
    """An 8-bit RGB copy of a decoded image.

    Grey, palette, CMYK, YCbCr etc. go through PIL's ``convert("RGB")`` (as the official RD
    code does); alpha is dropped, not composited. 16-bit grey (``I;16*``) keeps its top byte
    (``value >> 8``), as PIL already does when it reads 16-bit RGB(A) PNGs; ``convert`` would
    clip every value above 255 to white. 32-bit integer/float images raise a KdadError.
    """
    if _is_16_bit(img.mode):
        top_byte = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        img = Image.fromarray(top_byte)  # mode L
    elif img.mode not in _EIGHT_BIT_MODES:
        raise _unsupported(path, what, img.mode)
    return img.convert("RGB")


def _mask_array(img: Image.Image, path: Any = "?") -> np.ndarray:
    """Binary defect mask (bool HxW): a pixel is a defect when it is non-zero.

    Grey, bilevel, 16-bit, integer and float masks compare their values; palette masks their
    palette *indices* (index 0 = background); colour masks (RGB, CMYK, YCbCr...) count a pixel
    whose RGB has any non-zero band. Alpha is ignored (like for images).
    """
    mode = img.mode
    if mode in ("LA", "La", "PA"):
        img, mode = img.getchannel(0), mode[0]  # the grey value / palette index
    if mode in ("1", "L", "P", "I", "F") or _is_16_bit(mode):
        return np.asarray(img) != 0
    if mode in _EIGHT_BIT_MODES:
        return (np.asarray(img.convert("RGB")) != 0).any(axis=2)
    raise _unsupported(path, "mask", mode)


class _Decoded(NamedTuple):
    image: Tensor  # uint8 [3,H,W]
    mask: Tensor  # uint8 [1,h,w]
    file_defect_pixels: int  # defect pixels in the mask file (-1: no mask file)


def _decode(sample: Sample, size: tuple[int, int], mask_resolution: str) -> _Decoded:
    height, width = size
    img = _open_image(sample.image_path, "image")
    native = img.size  # (W, H)
    rgb = to_rgb(img, sample.image_path).resize((width, height), Image.BILINEAR)
    image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    if sample.mask_path is None:
        shape = (height, width) if mask_resolution == "input" else (native[1], native[0])
        return _Decoded(image, torch.zeros((1, *shape), dtype=torch.uint8), -1)

    mask_img = _open_image(sample.mask_path, "mask")
    if mask_img.size != native:
        raise KdadError(
            f"mask {sample.mask_path} is {mask_img.size[0]}x{mask_img.size[1]} but its image "
            f"{sample.image_path} is {native[0]}x{native[1]}; use a mask of the image's size"
        )
    binary = _mask_array(mask_img, sample.mask_path)
    defect_pixels = int(binary.sum())
    if mask_resolution == "input":
        as_float = Image.fromarray(binary.astype(np.float32))  # mode "F"
        resized = as_float.resize((width, height), Image.BILINEAR)
        binary = np.asarray(resized) > 0.5
    mask = torch.from_numpy(binary.astype(np.uint8)).unsqueeze(0)
    return _Decoded(image, mask, defect_pixels)


def decode_sample(sample: Sample, size: tuple[int, int], mask_resolution: str) -> tuple[Tensor, Tensor]:
    """Decode one sample: ``(image uint8 [3,H,W], mask uint8 [1,h,w])``."""
    decoded = _decode(sample, size, mask_resolution)
    return decoded.image, decoded.mask


def _warn_suspicious_masks(samples: Sequence[Sample], decoded: Sequence[_Decoded]) -> None:
    """One warning per kind of mask that is probably not what the user meant.

    * an anomalous image whose mask file has no defect pixel: it keeps label 1 (its folder or
      split file says defective) but adds no defect pixel to the pixel metrics;
    * a defect that vanishes when the mask is resized to the input size (bilinear, ``> 0.5``,
      as the official RD code does): ``data.mask_resolution=native`` keeps it;
    * a mask whose every pixel is a defect (inverted mask?).
    """
    empty, vanished, full = [], [], []
    for sample, item in zip(samples, decoded):
        if item.file_defect_pixels < 0:
            continue
        if sample.label == 1 and item.file_defect_pixels == 0:
            empty.append(sample.mask_path)
        elif sample.label == 1 and not bool(item.mask.any()):
            vanished.append(sample.mask_path)
        if bool(item.mask.all()):
            full.append(sample.mask_path)
    if empty:
        log.warning(
            "%d anomalous image(s) have a mask without any defect pixel (first: %s); they keep "
            "label 1 but add no defect pixels to the pixel metrics: fix the masks if the "
            "defects are real",
            len(empty),
            empty[0],
        )
    if vanished:
        log.warning(
            "%d mask(s) lose every defect pixel when resized to the input size (first: %s); "
            "set data.mask_resolution=native to evaluate pixels at the files' resolution",
            len(vanished),
            vanished[0],
        )
    if full:
        log.warning(
            "%d mask(s) mark every pixel as a defect (first: %s); masks must be non-zero on "
            "defects only (inverted mask?)",
            len(full),
            full[0],
        )


class CachedImageDataset(Dataset):
    """All images of a split, decoded once and kept in memory.

    images:     uint8 [N,3,H,W] RGB.
    masks:      uint8 [N,1,H,W] in {0,1} (``mask_resolution="input"``), or a list of
                uint8 [1,h_i,w_i] at the files' sizes (``"native"``).
    labels:     int64 [N] (1 = anomalous).
    mask_known: bool [N]; False for anomalous samples without a mask file.
    paths:      image paths (str).

    Decoding runs in a thread pool (PIL releases the GIL while decoding and resizing) and
    shows a rich progress bar when there are at least ``progress_min`` images.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        image_size: int | Sequence[int] = 256,
        mask_resolution: str = "input",
        num_threads: int | None = None,
        progress_min: int = 200,
        description: str = "decoding images",
    ) -> None:
        if mask_resolution not in _MASK_RESOLUTIONS:
            raise KdadError(
                f"invalid data.mask_resolution='{mask_resolution}'; use one of {', '.join(_MASK_RESOLUTIONS)}"
            )
        self.samples = list(samples)
        self.image_size = as_size(image_size)
        self.mask_resolution = mask_resolution
        self.paths = [str(s.image_path) for s in self.samples]
        self.defects = [s.defect for s in self.samples]
        self.labels = torch.tensor([int(s.label) for s in self.samples], dtype=torch.int64)
        self.mask_known = torch.tensor([s.mask_known for s in self.samples], dtype=torch.bool)

        decoded = self._decode_all(num_threads, progress_min, description)
        _warn_suspicious_masks(self.samples, decoded)
        height, width = self.image_size
        if decoded:
            self.images = torch.stack([item.image for item in decoded])
        else:
            self.images = torch.zeros((0, 3, height, width), dtype=torch.uint8)
        masks = [item.mask for item in decoded]
        if mask_resolution == "input":
            self.masks: Tensor | list[Tensor] = (
                torch.stack(masks) if masks else torch.zeros((0, 1, height, width), torch.uint8)
            )
        else:
            self.masks = masks

    def _decode_all(self, num_threads: int | None, progress_min: int, description: str) -> list[_Decoded]:
        n = len(self.samples)
        if n == 0:
            return []
        threads = num_threads or min(8, os.cpu_count() or 1)

        def work(sample: Sample) -> _Decoded:
            return _decode(sample, self.image_size, self.mask_resolution)

        if threads <= 1 and n < progress_min:
            return [work(s) for s in self.samples]
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            results = pool.map(work, self.samples)
            if n < progress_min:
                return list(results)
            from rich.progress import Progress  # imported lazily: only for big datasets

            out: list[_Decoded] = []
            with Progress(transient=True) as progress:
                task = progress.add_task(description, total=n)
                for item in results:
                    out.append(item)
                    progress.advance(task)
            return out

    @property
    def has_masks(self) -> bool:
        """True when every sample's pixel ground truth is known (pixel metrics possible)."""
        return bool(self.mask_known.all())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "label": self.labels[index],
            "mask": self.masks[index],
            "mask_known": self.mask_known[index],
            "path": self.paths[index],
        }


def collate(samples: Sequence[dict[str, Any]]) -> Batch:
    """Stack items of :class:`CachedImageDataset` into a :class:`Batch`.

    Masks become float32 in {0,1} (``MASK_UNKNOWN`` where the mask is unknown), stacked to
    [B,1,h,w] when all have the same size, else a list of [1,h_i,w_i]. Items of the
    synthetic-anomaly training set (:class:`~kdad.data.synthesis.SyntheticAnomalyDataset`)
    also fill ``aug_image`` (float32 [B,3,H,W] in [0,1]) and ``aug_mask`` (float32 [B,1,H,W]).
    """
    masks = []
    for item in samples:
        mask = item["mask"].to(torch.float32)
        if not bool(item["mask_known"]):
            mask = torch.full_like(mask, MASK_UNKNOWN)
        masks.append(mask)
    same_size = all(m.shape == masks[0].shape for m in masks)
    synthetic = all("aug_image" in item for item in samples)
    return Batch(
        image=torch.stack([item["image"] for item in samples]),
        label=torch.stack([torch.as_tensor(item["label"]) for item in samples]).to(torch.int64),
        mask=torch.stack(masks) if same_size else masks,
        path=[str(item["path"]) for item in samples],
        aug_image=torch.stack([item["aug_image"] for item in samples]) if synthetic else None,
        aug_mask=torch.stack([item["aug_mask"] for item in samples]) if synthetic else None,
    )
