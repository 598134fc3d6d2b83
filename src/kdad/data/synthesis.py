"""Synthetic anomalies: Perlin-noise regions filled with a foreign texture (DRAEM, URD).

One generator serves every method that trains on simulated defects (URD, ADPS, TDAD). A
normal training image ``x`` (RGB, [0,1]) becomes an anomalous view ``x̃`` with a binary mask
``m`` in four steps (``specs/rd_urd.md`` §3.5, ``specs/adps_tdad_dskd.md`` §1.4):

1. **Region.** Perlin gradient noise at scale ``2^a × 2^b`` lattice cells
   (``a, b ~ U{perlin_scale_exp}``) is rotated by ``U(-rotate_deg, rotate_deg)`` about the
   image centre and thresholded, ``m = noise > threshold``. Optionally ``m`` is multiplied by a
   foreground mask of the object (GrabCut or inverted Otsu, URD), so that defects land on the
   object and not on the background.
2. **Texture.** A foreign texture ``t``: a random image of a folder (``anomaly_source``, e.g.
   DTD's ``dtd/images``) resized to the image size, or, without a folder, a procedural
   colourful texture. ``texture_augment: draem`` applies three distinct random colour/geometry
   operations from DRAEM's list to it.
3. **Blend.** ``β ~ U(0, beta_max)`` and
   ``x̃ = x·(1−m) + (1−β)·t·m + β·x·m``: inside the region the texture shows through with
   opacity ``1−β``.
4. **Normal samples.** With probability ``1 − probability`` the sample stays normal
   (``x̃ = x``, ``m = 0``). DRAEM additionally rotates the image itself by ``U(-90°, 90°)``
   with probability ``rotate_image_probability`` (0.3) before anything else; only the
   augmented view is rotated, ``Batch.image`` stays the clean image.

Every random draw comes from a NumPy ``Generator`` handed in by the caller. In training it is
``default_rng([data.seed, epoch, sample index])`` (:func:`sample_rng`), so the anomalies of an
epoch depend only on these three numbers: not on ``num_workers``, not on the process that
runs the sample, not on anything else that draws random numbers. The samples reach the
loader as ``(index, epoch)`` keys from :class:`EpochKeySampler`, whose ``set_epoch`` Lightning's
fit loop calls at every epoch start (``lightning/pytorch/loops/fit_loop.py``,
``on_advance_start`` -> ``_set_sampler_epoch``).

Differences to the original code (our reconstruction, DESIGN §4): imgaug is replaced by
OpenCV (noise rotation: ``cv2.warpAffine``, bilinear, constant 0 border, as imgaug's
``Affine(rotate, order=1, cval=0)``) and albumentations (DRAEM's texture operations, see
:data:`DRAEM_TEXTURE_OPS`), and the draws come from NumPy generators instead of
``torch.randint`` / NumPy's global state, so the distributions are the same but not the
individual samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from kdad.data.dataset import _open_image
from kdad.data.readers import IMAGE_EXTENSIONS
from kdad.errors import KdadError

log = logging.getLogger(__name__)

#: Values of ``data.synthesis.foreground``.
FOREGROUND_MODES: tuple[str, ...] = ("auto", "none", "grabcut", "otsu_inv")
#: Values of ``data.synthesis.texture_augment``.
TEXTURE_AUGMENTS: tuple[str, ...] = ("none", "draem")

#: ``foreground: auto`` for MVTec AD: URD's per-category lists (``specs/rd_urd.md`` §3.5);
#: categories not listed (textures and transistor) get no foreground restriction.
MVTEC_FOREGROUND: dict[str, str] = {
    **dict.fromkeys(("bottle", "cable", "hazelnut", "metal_nut", "pill", "toothbrush", "zipper"), "grabcut"),
    **dict.fromkeys(("capsule", "screw"), "otsu_inv"),
    **dict.fromkeys(("carpet", "grid", "leather", "tile", "wood", "transistor"), "none"),
}
#: ``foreground: auto`` for whole datasets. VisA follows URD's ``train_visa.py`` (GrabCut for
#: every class). MPDD (GrabCut) and BTAD (none) are our choice: URD's code has no lists for
#: them (``specs/rd_urd.md`` §6.7).
DATASET_FOREGROUND: dict[str, str] = {"visa": "grabcut", "mpdd": "grabcut", "btad": "none"}

#: Version of the foreground computation; part of the cache key (bump when masks change).
FOREGROUND_VERSION = 1
GRABCUT_ITERATIONS = 11

#: DRAEM's "source image" rotation range (degrees) used with ``rotate_image_probability``.
IMAGE_ROTATION_DEG = 90.0


# --------------------------------------------------------------------------------------------
# Perlin noise and the anomaly region


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic interpolant 6t⁵ − 15t⁴ + 10t³ (zero first and second derivative at 0, 1)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise, float32 [H,W] in [-1, 1].

    Random unit gradients sit on a ``(res_y+1) × (res_x+1)`` lattice; a pixel takes the dot
    products of the four surrounding gradients with its offsets to those corners, blended
    bilinearly with quintic fade weights, times √2 (so the range is [-1, 1]). A lattice cell
    spans ``ceil(H / res_y) × ceil(W / res_x)`` pixels: when the size is not divisible by the
    scale this is the noise of a larger, divisible image cropped to ``H × W``. The noise is
    exactly 0 on lattice points.
    """
    height, width = shape
    res_y, res_x = res
    cell_y, cell_x = -(-height // res_y), -(-width // res_x)  # pixels per lattice cell
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(res_y + 1, res_x + 1))
    grad_y, grad_x = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    y = np.arange(height, dtype=np.float64) / cell_y  # lattice coordinates
    x = np.arange(width, dtype=np.float64) / cell_x
    iy, ix = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    fy = (y - iy).astype(np.float32)[:, None]  # [H,1] offsets inside the cell
    fx = (x - ix).astype(np.float32)[None, :]  # [1,W]

    def corner(dy: int, dx: int) -> np.ndarray:  # gradient · offset to corner (dy, dx): [H,W]
        gy = grad_y[iy + dy][:, ix + dx]
        gx = grad_x[iy + dy][:, ix + dx]
        return gy * (fy - dy) + gx * (fx - dx)

    u, v = _fade(fy), _fade(fx)
    left = corner(0, 0) * (1.0 - u) + corner(1, 0) * u
    right = corner(0, 1) * (1.0 - u) + corner(1, 1) * u
    return (math.sqrt(2.0) * (left * (1.0 - v) + right * v)).astype(np.float32)


def random_perlin_noise(shape: tuple[int, int], scale_exp: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise at scale ``2^a × 2^b`` with ``a, b`` uniform in ``scale_exp`` (inclusive)."""
    a, b = rng.integers(scale_exp[0], scale_exp[1] + 1, size=2)
    return perlin_noise(shape, (2 ** int(a), 2 ** int(b)), rng)


def rotate_array(array: np.ndarray, angle_deg: float, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """Rotate an [H,W] or [H,W,C] array about its centre, counter-clockwise as displayed.

    ``cv2.warpAffine`` with a constant 0 border: imgaug's ``Affine(rotate=..., order=1,
    cval=0)`` with the centre at ``((W-1)/2, (H-1)/2)``. Shape and dtype are kept.
    """
    height, width = array.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2.0, (height - 1) / 2.0), float(angle_deg), 1.0)
    rotated = cv2.warpAffine(
        array,
        matrix,
        (width, height),
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    return rotated.reshape(array.shape)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    scale_exp: tuple[int, int] = (0, 5),
    threshold: float = 0.5,
    rotate_deg: float = 90.0,
) -> np.ndarray:
    """The anomaly region, bool [H,W]: rotated Perlin noise ``> threshold``."""
    noise = random_perlin_noise(shape, scale_exp, rng)
    angle = rng.uniform(-rotate_deg, rotate_deg)
    return rotate_array(noise, angle) > threshold


def blend_anomaly(image: np.ndarray, texture: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
    """``x·(1−m) + (1−β)·t·m + β·x·m`` for float [H,W,3] images in [0,1] and a [H,W] mask."""
    m = mask.astype(np.float32)[..., None]
    return image * (1.0 - m) + (1.0 - beta) * texture * m + beta * image * m


# --------------------------------------------------------------------------------------------
# textures


def procedural_texture(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random colourful texture, uint8 [H,W,3], for runs without a texture folder.

    Two or three random colours mixed by low-frequency Perlin noise, overlaid with one random
    pattern (none, stripes at a random angle and period, checks, or speckle) in a fourth
    colour, plus a little pixel noise. It stands in for DTD (which must be downloaded); it is
    *not* part of any paper, and DTD gives the published numbers.
    """
    height, width = size
    n_colours = int(rng.integers(2, 4))
    colours = rng.uniform(0.0, 255.0, size=(n_colours, 3)).astype(np.float32)
    mix = np.clip(0.5 + 0.8 * random_perlin_noise(size, (1, 3), rng), 0.0, 1.0)[..., None]
    image = colours[0] + (colours[1] - colours[0]) * mix  # [H,W,3]
    if n_colours == 3:
        blob = np.clip(2.0 * random_perlin_noise(size, (1, 3), rng), 0.0, 1.0)[..., None]
        image += (colours[2] - image) * blob

    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    kind = int(rng.integers(0, 4))
    if kind == 1:  # stripes
        angle = rng.uniform(0.0, math.pi)
        period = rng.uniform(3.0, max(4.0, min(height, width) / 3.0))
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * np.float32(2.0 * math.pi / period)
        pattern = np.sin(phase) > rng.uniform(-0.6, 0.6)
    elif kind == 2:  # checks
        cell_y, cell_x = rng.integers(2, max(3, min(height, width) // 4), size=2)
        pattern = ((yy // cell_y + xx // cell_x) % 2) == 0
    elif kind == 3:  # speckle
        pattern = rng.random(size, dtype=np.float32) < rng.uniform(0.05, 0.35)
    else:
        pattern = np.zeros(size, dtype=bool)
    strength = np.float32(rng.uniform(0.3, 1.0))
    colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
    image = np.where(pattern[..., None], image + (colour - image) * strength, image)
    sigma = np.float32(rng.uniform(0.0, 12.0))
    image += sigma * rng.standard_normal((height, width, 1), dtype=np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class TextureFolder:
    """Every image file under ``root`` (recursive, sorted paths): DTD's ``dtd/images`` or any
    folder of textures. Images are loaded on demand, RGB, PIL bilinear resize to the image size.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise KdadError(
                f"anomaly_source={self.root} is not a folder; set anomaly_source to a folder of "
                "texture images (e.g. dtd/images of the DTD dataset) or null for procedural textures"
            )
        self.paths = sorted(
            p
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
        )
        if not self.paths:
            raise KdadError(
                f"anomaly_source={self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                "point anomaly_source at a folder of texture images (e.g. dtd/images) or set it to null"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, size: tuple[int, int]) -> np.ndarray:
        """Texture ``index`` as uint8 [H,W,3]."""
        img = _open_image(self.paths[index], "texture (anomaly_source)")
        rgb = img.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
        return np.array(rgb, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"TextureFolder({str(self.root)!r}, {len(self.paths)} images)"


# --------------------------------------------------------------------------------------------
# DRAEM's texture augmentation (albumentations counterparts of its imgaug operations)


def _albumentations_op(factory: Callable[[np.random.Generator], Any], per_channel: bool = False) -> Callable:
    """An operation ``(uint8 [H,W,3], rng) -> uint8 [H,W,3]`` running an albumentations
    transform seeded from ``rng`` (deterministic). ``per_channel``: an independent draw for
    each channel (imgaug's ``per_channel=True``)."""
    import albumentations as A

    def run(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        compose = A.Compose([factory(rng)], p=1.0, seed=int(rng.integers(2**31)))
        return np.ascontiguousarray(compose(image=np.ascontiguousarray(image))["image"])

    def op(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not per_channel:
            return run(image, rng)
        return np.concatenate([run(image[..., c : c + 1], rng) for c in range(image.shape[2])], axis=2)

    return op


def _brightness(rng: np.random.Generator) -> Any:
    import albumentations as A

    return A.Compose(
        [  # multiply then add, both to all channels alike (imgaug: to the luminance)
            A.MultiplicativeNoise(multiplier=(0.8, 1.2), per_channel=False, elementwise=False, p=1.0),
            A.RandomBrightnessContrast(
                brightness_limit=(-30 / 255, 30 / 255), contrast_limit=(0.0, 0.0), brightness_by_max=True, p=1.0
            ),
        ]
    )


@lru_cache(maxsize=1)
def _draem_ops() -> dict[str, Callable]:
    import albumentations as A

    return {
        # imgaug GammaContrast((0.5, 2.0), per_channel=True)
        "gamma": _albumentations_op(lambda rng: A.RandomGamma(gamma_limit=(50, 200), p=1.0), per_channel=True),
        # imgaug MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))
        "brightness": _albumentations_op(_brightness),
        # imgaug pillike.EnhanceSharpness(): albumentations only sharpens (PIL factor < 1 blurs)
        "sharpen": _albumentations_op(lambda rng: A.Sharpen(alpha=(0.0, 1.0), lightness=(1.0, 1.0), p=1.0)),
        # imgaug AddToHueAndSaturation((-50, 50), per_channel=True): imgaug's hue unit is 180/255
        # of OpenCV's, so ±50 -> ±35 in OpenCV's [0, 180) hue range
        "hue_saturation": _albumentations_op(
            lambda rng: A.HueSaturationValue(
                hue_shift_limit=50 * 180 / 255, sat_shift_limit=50, val_shift_limit=0, p=1.0
            )
        ),
        # imgaug Solarize(0.5, threshold=(32, 128))
        "solarize": _albumentations_op(lambda rng: A.Solarize(threshold_range=(32 / 255, 128 / 255), p=0.5)),
        # imgaug Posterize() (1 to 8 bits)
        "posterize": _albumentations_op(lambda rng: A.Posterize(num_bits=(1, 8), p=1.0)),
        # imgaug Invert()
        "invert": _albumentations_op(lambda rng: A.InvertImg(p=1.0)),
        # imgaug pillike.Autocontrast() (cutoff 0..20 %)
        "autocontrast": _albumentations_op(
            lambda rng: A.AutoContrast(cutoff=float(rng.integers(0, 21)), method="pil", p=1.0)
        ),
        # imgaug pillike.Equalize()
        "equalize": _albumentations_op(lambda rng: A.Equalize(mode="pil", by_channels=True, p=1.0)),
        # imgaug Affine(rotate=(-45, 45)): bilinear, constant 0 border
        "rotate": _albumentations_op(
            lambda rng: A.Affine(
                rotate=(-45, 45), interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0
            )
        ),
    }


#: DRAEM's texture operations, in DRAEM's order (``data_loader.py``): three distinct ones are
#: drawn per texture and applied in the drawn order.
DRAEM_TEXTURE_OPS: tuple[str, ...] = (
    "gamma",
    "brightness",
    "sharpen",
    "hue_saturation",
    "solarize",
    "posterize",
    "invert",
    "autocontrast",
    "equalize",
    "rotate",
)


def draem_texture_augment(texture: np.ndarray, rng: np.random.Generator, num_ops: int = 3) -> np.ndarray:
    """DRAEM's random texture jitter: ``num_ops`` distinct operations of
    :data:`DRAEM_TEXTURE_OPS`, uint8 [H,W,3] -> uint8 [H,W,3]."""
    ops = _draem_ops()
    chosen = rng.choice(len(DRAEM_TEXTURE_OPS), size=num_ops, replace=False)
    for i in chosen:
        texture = ops[DRAEM_TEXTURE_OPS[int(i)]](texture, rng)
    return texture


# --------------------------------------------------------------------------------------------
# foreground masks (URD)


def resolve_foreground(mode: str, dataset_format: str, category: str) -> str:
    """The foreground mode for a dataset and category (``auto`` -> a concrete mode).

    =========  =====================================================================
    format     ``auto`` gives
    =========  =====================================================================
    mvtec      grabcut: bottle, cable, hazelnut, metal_nut, pill, toothbrush, zipper;
               otsu_inv: capsule, screw; none: carpet, grid, leather, tile, wood,
               transistor (URD's lists)
    visa       grabcut (URD's ``train_visa.py``)
    mpdd       grabcut (our choice)
    btad       none (our choice)
    demo       grabcut for the objects (washer, pill), none for the textures
    other      none
    =========  =====================================================================
    """
    if mode != "auto":
        return mode
    if dataset_format == "mvtec":
        return MVTEC_FOREGROUND.get(category, "none")
    if dataset_format == "demo":
        from kdad.data.demo import DEMO_OBJECTS

        return "grabcut" if category in DEMO_OBJECTS else "none"
    return DATASET_FOREGROUND.get(dataset_format, "none")


def grabcut_foreground(rgb: np.ndarray, iterations: int = GRABCUT_ITERATIONS) -> np.ndarray:
    """URD's GrabCut foreground, bool [H,W], of an RGB uint8 [H,W,3] image.

    OpenCV GrabCut on the BGR image initialised with the rectangle (1, 1, W−1, H−1) (the
    outermost row and column are background), 11 iterations; foreground = definite or probable
    foreground. An image GrabCut cannot segment (e.g. a single colour) gets an all-true mask.
    """
    height, width = rgb.shape[:2]
    if height < 3 or width < 3:
        return np.ones((height, width), dtype=bool)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    mask = np.zeros((height, width), np.uint8)
    rect = (1, 1, width - 1, height - 1)  # x, y, w, h: valid because 1 + (W-1) = W
    background_model = np.zeros((1, 65), np.float64)
    foreground_model = np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(bgr, mask, rect, background_model, foreground_model, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error:
        return np.ones((height, width), dtype=bool)
    return (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)


def otsu_inv_foreground(rgb: np.ndarray) -> np.ndarray:
    """URD's foreground for capsule and screw, bool [H,W]: pixels darker than Otsu's threshold
    of the grey image (``THRESH_BINARY_INV + THRESH_OTSU``)."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    _, binary = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return binary > 0


_FOREGROUND_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "grabcut": grabcut_foreground,
    "otsu_inv": otsu_inv_foreground,
}


def default_foreground_cache() -> Path:
    """``$KDAD_CACHE/foreground`` if ``KDAD_CACHE`` is set, else ``~/.cache/kdad/foreground``."""
    cache = os.environ.get("KDAD_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "kdad"
    return base / "foreground"


def _cache_key(path: str, size: tuple[int, int], mode: str) -> str | None:
    """Hash of (absolute path, mtime, file size, image size, mode); None if the file is gone."""
    try:
        absolute = Path(path).expanduser().resolve()
        stat = absolute.stat()
    except OSError:
        return None
    fields = [str(absolute), stat.st_mtime_ns, stat.st_size, list(size), mode, FOREGROUND_VERSION]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def _read_cached(file: Path, size: tuple[int, int]) -> np.ndarray | None:
    try:
        with Image.open(file) as img:
            mask = np.asarray(img.convert("L")) > 127
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):  # missing/corrupt: recompute
        return None
    return mask if mask.shape == tuple(size) else None


def _write_cached(file: Path, mask: np.ndarray) -> None:
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
        os.replace(tmp, file)
    except OSError as err:  # a read-only cache only costs time
        log.debug("cannot write foreground cache %s: %s", file, err)


def compute_foreground_masks(
    images: Tensor,
    paths: Sequence[str],
    mode: str,
    cache_dir: str | os.PathLike[str] | None = None,
    num_threads: int | None = None,
    progress_min: int = 32,
) -> Tensor:
    """Foreground masks, bool [N,H,W], of uint8 [N,3,H,W] images (computed once, cached).

    ``mode`` is ``grabcut`` or ``otsu_inv``. Each mask is cached as a PNG under ``cache_dir``
    (default :func:`default_foreground_cache`) keyed by a hash of the image file's absolute
    path, modification time and size, the image size and the mode; a cache file that cannot be
    read is recomputed. Misses run in a thread pool (OpenCV releases the GIL) with a rich
    progress bar when there are at least ``progress_min`` of them.
    """
    if mode not in _FOREGROUND_FUNCTIONS:
        raise KdadError(f"invalid foreground mode {mode!r}; use one of {', '.join(_FOREGROUND_FUNCTIONS)}")
    function = _FOREGROUND_FUNCTIONS[mode]
    count, _, height, width = images.shape
    size = (int(height), int(width))
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_foreground_cache()
    masks: list[np.ndarray | None] = [None] * count
    files: list[Path | None] = [None] * count
    for i, path in enumerate(paths):
        key = _cache_key(path, size, mode)
        if key is not None:
            files[i] = cache / mode / key[:2] / f"{key}.png"
            masks[i] = _read_cached(files[i], size)
    missing = [i for i in range(count) if masks[i] is None]

    def work(i: int) -> np.ndarray:
        mask = function(images[i].permute(1, 2, 0).numpy())
        if files[i] is not None:
            _write_cached(files[i], mask)
        return mask

    if missing:
        threads = max(1, num_threads or min(8, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            results = pool.map(work, missing)
            if len(missing) >= progress_min:
                from rich.progress import Progress

                with Progress(transient=True) as progress:
                    task = progress.add_task(f"foreground masks ({mode})", total=len(missing))
                    for i, mask in zip(missing, results):
                        masks[i] = mask
                        progress.advance(task)
            else:
                for i, mask in zip(missing, results):
                    masks[i] = mask
    log.info("foreground masks (%s): %d computed, %d from cache %s", mode, len(missing), count - len(missing), cache)
    if count == 0:
        return torch.zeros((0, *size), dtype=torch.bool)
    stacked = torch.from_numpy(np.stack([m for m in masks if m is not None]))
    empty = int((stacked.flatten(1).sum(1) == 0).sum())
    if empty:
        log.warning(
            "%d of %d training images have an empty %s foreground: they never get synthetic anomalies",
            empty,
            count,
            mode,
        )
    return stacked


# --------------------------------------------------------------------------------------------
# the synthesiser


def _probability(value: Any, key: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise KdadError(f"data.synthesis.{key}={value!r} is not a probability; use a number in [0, 1]")
    return value


class AnomalySynthesizer:
    """Turns a normal image into a synthetic anomaly and its mask (see the module docstring).

    Args:
        texture_source: folder of texture images (recursive; DTD: ``dtd/images``), or ``None``
            for :func:`procedural_texture`. Users set it with the top-level ``anomaly_source``.
        probability: chance that a sample gets an anomaly (URD, TDAD: 1.0; DRAEM, ADPS: 0.5).
        foreground: ``auto`` | ``none`` | ``grabcut`` | ``otsu_inv``: the foreground restriction
            the datamodule computes for the training images (``auto``: :func:`resolve_foreground`).
        texture_augment: ``none`` (URD) | ``draem`` (three random DRAEM operations).
        rotate_image_probability: DRAEM rotates the image itself by U(−90°, 90°) with p 0.3.
        beta_max: texture opacity ``1−β`` with ``β ~ U(0, beta_max)``.
        perlin_scale_exp: ``[min, max]`` exponents of the Perlin scales (inclusive).
        threshold: noise threshold of the region.
        rotate_deg: the noise is rotated by U(−rotate_deg, rotate_deg).
    """

    def __init__(
        self,
        texture_source: str | os.PathLike[str] | None = None,
        probability: float = 1.0,
        foreground: str = "auto",
        texture_augment: str = "none",
        rotate_image_probability: float = 0.0,
        beta_max: float = 0.8,
        perlin_scale_exp: Sequence[int] = (0, 5),
        threshold: float = 0.5,
        rotate_deg: float = 90.0,
    ) -> None:
        self.probability = _probability(probability, "probability")
        self.rotate_image_probability = _probability(rotate_image_probability, "rotate_image_probability")
        self.beta_max = _probability(beta_max, "beta_max")
        if foreground not in FOREGROUND_MODES:
            raise KdadError(
                f"invalid data.synthesis.foreground={foreground!r}; use one of {', '.join(FOREGROUND_MODES)}"
            )
        if texture_augment not in TEXTURE_AUGMENTS:
            raise KdadError(
                f"invalid data.synthesis.texture_augment={texture_augment!r}; use one of {', '.join(TEXTURE_AUGMENTS)}"
            )
        self.foreground = foreground
        self.texture_augment = texture_augment
        exps = (
            list(perlin_scale_exp)
            if isinstance(perlin_scale_exp, Sequence) and not isinstance(perlin_scale_exp, str)
            else []
        )
        if (
            len(exps) != 2
            or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in exps)
            or not 0 <= exps[0] <= exps[1] <= 10
        ):
            raise KdadError(
                f"invalid data.synthesis.perlin_scale_exp={perlin_scale_exp!r}; "
                "use [min, max] integers with 0 <= min <= max <= 10"
            )
        self.perlin_scale_exp = (int(exps[0]), int(exps[1]))
        try:
            self.threshold = float(threshold)
            self.rotate_deg = float(rotate_deg)
        except (TypeError, ValueError) as err:
            raise KdadError(
                f"data.synthesis.threshold={threshold!r} / rotate_deg={rotate_deg!r} must be numbers"
            ) from err
        if not -1.0 <= self.threshold < 1.0:
            raise KdadError(
                f"invalid data.synthesis.threshold={threshold!r}; Perlin noise lies in [-1, 1], use a value in [-1, 1)"
            )
        if not 0.0 <= self.rotate_deg <= 180.0:
            raise KdadError(f"invalid data.synthesis.rotate_deg={rotate_deg!r}; use an angle in [0, 180]")
        if texture_source is not None and not isinstance(texture_source, (str, os.PathLike)):
            raise KdadError(f"invalid anomaly_source={texture_source!r}; use a folder path or null")
        self.textures = TextureFolder(texture_source) if texture_source not in (None, "") else None

    def texture(self, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A (possibly augmented) texture, uint8 [H,W,3]."""
        if self.textures is not None:
            texture = self.textures.load(int(rng.integers(len(self.textures))), size)
        else:
            texture = procedural_texture(size, rng)
        if self.texture_augment == "draem":
            texture = draem_texture_augment(texture, rng)
        return texture

    def __call__(self, image: Tensor, foreground: Tensor | None, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """``(aug_image float32 [3,H,W] in [0,1], aug_mask float32 [1,H,W] in {0,1})`` from a
        uint8 [3,H,W] image and an optional bool [H,W] foreground mask."""
        x = image.permute(1, 2, 0).numpy()  # uint8 [H,W,3]
        size = (int(x.shape[0]), int(x.shape[1]))
        fg = None if foreground is None else foreground.numpy().astype(bool)
        if rng.random() < self.rotate_image_probability:  # DRAEM: rotate the image itself
            angle = rng.uniform(-IMAGE_ROTATION_DEG, IMAGE_ROTATION_DEG)
            x = rotate_array(x, angle)
            if fg is not None:
                fg = rotate_array(fg.astype(np.uint8), angle, cv2.INTER_NEAREST).astype(bool)
        clean = x.astype(np.float32) / 255.0
        if not rng.random() < self.probability:  # a normal sample
            return _to_tensors(clean, np.zeros(size, dtype=bool))
        texture = self.texture(size, rng).astype(np.float32) / 255.0
        mask = perlin_mask(size, rng, self.perlin_scale_exp, self.threshold, self.rotate_deg)
        if fg is not None:
            mask &= fg
        beta = rng.uniform(0.0, self.beta_max)
        return _to_tensors(blend_anomaly(clean, texture, mask, beta), mask)

    def __repr__(self) -> str:
        source = repr(self.textures) if self.textures is not None else "procedural"
        return (
            f"AnomalySynthesizer(textures={source}, probability={self.probability}, "
            f"foreground={self.foreground!r}, texture_augment={self.texture_augment!r}, "
            f"rotate_image_probability={self.rotate_image_probability}, beta_max={self.beta_max}, "
            f"perlin_scale_exp={list(self.perlin_scale_exp)}, threshold={self.threshold}, rotate_deg={self.rotate_deg})"
        )


def _to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[Tensor, Tensor]:
    chw = np.ascontiguousarray(np.clip(image, 0.0, 1.0).transpose(2, 0, 1), dtype=np.float32)  # [3,H,W]
    return torch.from_numpy(chw), torch.from_numpy(mask.astype(np.float32)[None])


# --------------------------------------------------------------------------------------------
# data flow: (index, epoch) keys -> per-sample generators


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of training sample ``index`` in ``epoch``: ``default_rng([seed, epoch, index])``."""
    return np.random.default_rng([int(seed) % 2**64, int(epoch), int(index)])


class EpochKeySampler(Sampler[tuple[int, int]]):
    """Yields ``(index, epoch)`` keys in a shuffled order that depends only on (seed, epoch).

    Lightning calls :meth:`set_epoch` at every epoch start. Each pass also advances the epoch
    by one afterwards, so a loop that does not call ``set_epoch`` (e.g. under DDP, where
    Lightning wraps this sampler in a ``DistributedSamplerWrapper`` and sets the wrapper's
    epoch) still sees a new epoch each pass.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        rng = np.random.default_rng([self.seed % 2**64, int(epoch)])
        return rng.permutation(self.num_samples).tolist()

    def __iter__(self):  # type: ignore[override]
        epoch = self.epoch
        self.epoch = epoch + 1
        return iter([(i, epoch) for i in self.order(epoch)])

    def __len__(self) -> int:
        return self.num_samples


class SyntheticAnomalyDataset(Dataset):
    """A training dataset whose items also carry ``aug_image`` / ``aug_mask``.

    Wraps the decoded images (:class:`~kdad.data.dataset.CachedImageDataset`); item
    ``(index, epoch)`` is synthesised with :func:`sample_rng` ``(seed, epoch, index)`` and the
    image's foreground mask (bool [N,H,W] or None). A plain int key means epoch 0.
    """

    def __init__(
        self, base: Dataset, synthesizer: AnomalySynthesizer, seed: int = 0, foreground: Tensor | None = None
    ) -> None:
        self.base = base
        self.synthesizer = synthesizer
        self.seed = int(seed)
        self.foreground = foreground

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        item = dict(self.base[index])
        foreground = self.foreground[index] if self.foreground is not None else None
        aug_image, aug_mask = self.synthesizer(item["image"], foreground, sample_rng(self.seed, epoch, index))
        item["aug_image"] = aug_image
        item["aug_mask"] = aug_mask
        return item
