"""kdad's built-in demo dataset: procedural textures and objects with exact defect masks.

The set is written in MVTec AD layout (``<cat>/train/good``, ``<cat>/test/<defect>``,
``<cat>/ground_truth/<defect>/<stem>_mask.png`` with 0/255 masks) so that the MVTec reader
reads it unchanged. Generation is deterministic: every image draws from its own NumPy
``default_rng([seed, category index, split code, image index])``, so the same arguments
give byte-identical PNG files, and a smaller set is a prefix of a larger one.

Categories (:data:`DEMO_CATEGORIES`):

* ``weave``  (texture): a regular over/under weave of sand-coloured threads.
* ``marble`` (texture): a mottled grey stone made of multi-octave value noise.
* ``washer`` (object):  a shaded metal ring on a dark plain background.
* ``pill``   (object):  a red-and-white capsule on a dark background.

Normal images vary a little (thread phase, noise field, object position/size/rotation,
brightness, pixel noise) but are statistically homogeneous. Defects are deliberately
high-contrast and large (about 1-8 % of the image): a demo run trains Reverse Distillation
with a *randomly initialised* ResNet-18 at low resolution and must still detect them.
Defect kinds: ``scratch`` (straight thick line), ``stain`` (colour blob), ``hole`` (dark
region; on objects ``missing_piece``: a bite replaced by background) and ``crack`` (jagged
dark random-walk line). Each mask is exactly the set of pixels the defect changed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kdad.errors import KdadError

#: Version of the generator; bump whenever the produced bytes change.
DEMO_VERSION = 1

DEMO_TEXTURES: tuple[str, ...] = ("weave", "marble")
DEMO_OBJECTS: tuple[str, ...] = ("washer", "pill")
#: All demo categories, textures first.
DEMO_CATEGORIES: tuple[str, ...] = DEMO_TEXTURES + DEMO_OBJECTS

#: Defect kinds per category (test folder names).
DEMO_DEFECTS: dict[str, tuple[str, ...]] = {
    "weave": ("scratch", "stain", "hole", "crack"),
    "marble": ("scratch", "stain", "hole", "crack"),
    "washer": ("scratch", "stain", "missing_piece", "crack"),
    "pill": ("scratch", "stain", "missing_piece", "crack"),
}

#: Colours (RGB) painted by each defect kind, per category: chosen to contrast with the
#: normal appearance. ``None`` means "replace by the background" (missing piece).
_DEFECT_COLOURS: dict[str, dict[str, tuple[int, int, int] | None]] = {
    "weave": {"scratch": (235, 240, 255), "stain": (40, 80, 200), "hole": (8, 8, 8), "crack": (20, 12, 6)},
    "marble": {"scratch": (252, 252, 252), "stain": (190, 30, 30), "hole": (5, 5, 5), "crack": (10, 10, 10)},
    "washer": {"scratch": (40, 28, 20), "stain": (205, 105, 25), "missing_piece": None, "crack": (10, 10, 10)},
    "pill": {"scratch": (20, 20, 20), "stain": (50, 150, 40), "missing_piece": None, "crack": (30, 20, 90)},
}

MARKER_NAME = ".kdad_demo.json"
_SPLIT_CODES = {"train": 0, "test_good": 1, "test_defect": 2}


def default_demo_root() -> Path:
    """``$KDAD_CACHE/demo`` if ``KDAD_CACHE`` is set, else ``~/.cache/kdad/demo``."""
    cache = os.environ.get("KDAD_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "kdad"
    return base / "demo"


# --------------------------------------------------------------------------------------------
# normal appearance
# --------------------------------------------------------------------------------------------
class _Scene:
    """A clean image (uint8 HxWx3) plus where defects may go and what lies behind objects."""

    def __init__(self, image: np.ndarray, region: np.ndarray, background: np.ndarray) -> None:
        self.image = image
        self.region = region  # bool HxW: where defects are placed (object, or everywhere)
        self.background = background  # uint8 HxWx3 (for missing pieces)


def _finish(rgb: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Add Gaussian pixel noise (std ``noise``) and round to uint8."""
    noisy = rgb.astype(np.float32) + rng.standard_normal(rgb.shape, dtype=np.float32) * noise
    np.rint(noisy, out=noisy)
    np.clip(noisy, 0, 255, out=noisy)
    return noisy.astype(np.uint8)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a random ``cells``-grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 3, cells + 3)).astype(np.float32)
    step = size / cells
    big = round(step * (cells + 3))
    up = np.asarray(Image.fromarray(grid).resize((big, big), Image.BICUBIC))
    off = round(step * 1.5) + int(rng.integers(0, max(1, int(step))))
    off = min(off, big - size)
    return up[off : off + size, off : off + size]


def _weave(rng: np.random.Generator, size: int) -> _Scene:
    period = 16.0 * size / 256.0
    dx, dy = rng.uniform(0.0, period, size=2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    u = ((x + dx) % period) / period
    v = ((y + dy) % period) / period
    width = 0.75
    horizontal, vertical = v < width, u < width
    prof_h = np.sin(np.pi * np.clip(v / width, 0, 1))
    prof_v = np.sin(np.pi * np.clip(u / width, 0, 1))
    checker = ((np.floor((x + dx) / period) + np.floor((y + dy) / period)) % 2) == 0
    both = horizontal & vertical
    intensity = np.where(
        both, np.where(checker, prof_h, prof_v), np.where(horizontal, prof_h, np.where(vertical, prof_v, 0.0))
    )
    gap = np.array([95.0, 75.0, 52.0], np.float32)
    thread = np.array([205.0, 175.0, 125.0], np.float32) * np.float32(rng.uniform(0.96, 1.04))
    on = (horizontal | vertical)[..., None]
    rgb = np.where(on, gap + (thread - gap) * (0.45 + 0.55 * intensity[..., None]), gap)
    image = _finish(rgb, rng, 4.0)
    return _Scene(image, np.ones((size, size), bool), image)


def _marble(rng: np.random.Generator, size: int) -> _Scene:
    field = sum(_value_noise(rng, size, c) / (c**0.6) for c in (4, 8, 16, 32))
    field = field / 0.9  # roughly [-1, 1]
    base = np.array([140.0, 140.0, 135.0], np.float32) * np.float32(rng.uniform(0.96, 1.04))
    tint = np.array([1.0, 1.0, 0.95], np.float32)
    rgb = base + 35.0 * np.clip(field, -1.5, 1.5)[..., None] * tint
    image = _finish(rgb, rng, 3.0)
    return _Scene(image, np.ones((size, size), bool), image)


def _plain_background(rng: np.random.Generator, size: int, colour: Sequence[float]) -> np.ndarray:
    rgb = np.broadcast_to(np.asarray(colour, np.float32), (size, size, 3))
    return _finish(rgb, rng, 3.0)


def _washer(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    background = _plain_background(rng, size, (45.0, 48.0, 56.0))
    cx, cy = size / 2 + np.clip(rng.normal(0.0, 2.0 * s, size=2), -6 * s, 6 * s)
    r_out = 0.36 * size * rng.uniform(0.98, 1.02)
    r_in = 0.42 * r_out
    light = rng.uniform(-0.1, 0.1) + np.pi * 0.75
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(x - cx, y - cy)
    theta = np.arctan2(y - cy, x - cx)
    ring = (r >= r_in) & (r <= r_out)
    shade = 180.0 + 24.0 * np.cos(theta - light) * np.float32(rng.uniform(0.95, 1.05))
    groove = np.abs(r - 0.72 * r_out) < 2.0 * s
    shade = np.where(groove, shade - 45.0, shade)
    metal = shade[..., None] * np.array([1.0, 1.0, 1.04], np.float32)
    image = np.where(ring[..., None], _finish(metal, rng, 3.0), background)
    return _Scene(image, ring, background)


def _pill(rng: np.random.Generator, size: int) -> _Scene:
    s = size / 256.0
    background = _plain_background(rng, size, (32.0, 38.0, 48.0))
    cx, cy = size / 2 + np.clip(rng.normal(0.0, 3.0 * s, size=2), -8 * s, 8 * s)
    phi = np.deg2rad(rng.uniform(-6.0, 6.0))
    length, half_w = 0.64 * size, 0.14 * size
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    a = (x - cx) * np.cos(phi) + (y - cy) * np.sin(phi)
    b = -(x - cx) * np.sin(phi) + (y - cy) * np.cos(phi)
    d = np.maximum(np.abs(a) - (length / 2 - half_w), 0.0)
    rr = (d**2 + b**2) / half_w**2
    body = rr <= 1.0
    shade = 0.6 + 0.4 * np.sqrt(np.clip(1.0 - rr, 0.0, 1.0), dtype=np.float32)
    gain = rng.uniform(0.96, 1.04)
    red = np.array([205.0, 45.0, 40.0], np.float32) * np.float32(gain)
    white = np.array([238.0, 232.0, 220.0], np.float32) * np.float32(gain)
    colour = np.where((a < 0)[..., None], red, white)
    image = np.where(body[..., None], _finish(colour * shade[..., None], rng, 3.0), background)
    return _Scene(image, body, background)


_GENERATORS: dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "weave": _weave,
    "marble": _marble,
    "washer": _washer,
    "pill": _pill,
}


# --------------------------------------------------------------------------------------------
# defects
# --------------------------------------------------------------------------------------------
def _point_in(rng: np.random.Generator, region: np.ndarray, margin: int) -> tuple[float, float]:
    """A random (x, y) inside ``region``, at least ``margin`` pixels from the border."""
    size = region.shape[0]
    inner = np.zeros_like(region)
    inner[margin : size - margin, margin : size - margin] = True
    ys, xs = np.nonzero(region & inner)
    if len(xs) == 0:
        ys, xs = np.nonzero(region)
    k = int(rng.integers(0, len(xs)))
    return float(xs[k]), float(ys[k])


def _paint_region(kind: str, rng: np.random.Generator, scene: _Scene) -> np.ndarray:
    """Bool HxW: the pixels a defect of ``kind`` paints over."""
    size = scene.image.shape[0]
    s = size / 256.0
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = _point_in(rng, scene.region, int(48 * s))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.22, 0.32) * size
        dx, dy = half * np.cos(angle), half * np.sin(angle)
        width = max(2, round(rng.uniform(0.045, 0.065) * size))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=width)
    elif kind == "stain":
        for _ in range(int(rng.integers(3, 6))):
            ox, oy = rng.normal(0.0, 0.04 * size, size=2)
            rx, ry = rng.uniform(0.05, 0.1, size=2) * size
            draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
    elif kind == "hole":
        n = int(rng.integers(7, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = rng.uniform(0.08, 0.13, size=n) * size
        draw.polygon([(cx + r * np.cos(t), cy + r * np.sin(t)) for r, t in zip(radii, angles)], fill=255)
    elif kind == "missing_piece":
        # a bite centred on the object's outline: choose a region pixel next to the outside
        region = scene.region
        edge = region & ~(
            np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1) & np.roll(region, -1, 1)
        )
        ex, ey = _point_in(rng, edge, int(24 * s))
        r = rng.uniform(0.11, 0.15) * size
        draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=255)
    elif kind == "crack":
        width = max(2, round(rng.uniform(0.035, 0.045) * size))
        heading = rng.uniform(0, 2 * np.pi)
        points = [(cx, cy)]
        for _ in range(int(rng.integers(10, 15))):
            heading += rng.uniform(-0.7, 0.7)
            step = 0.045 * size
            x0, y0 = points[-1]
            points.append((x0 + step * np.cos(heading), y0 + step * np.sin(heading)))
        draw.line(points, fill=255, width=width, joint="curve")
    else:  # pragma: no cover - guarded by DEMO_DEFECTS
        raise ValueError(kind)
    return (np.asarray(canvas) > 0) & scene.region


def _make_defect(category: str, kind: str, rng: np.random.Generator, scene: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect: (defective uint8 HxWx3, mask bool HxW = exactly the changed pixels)."""
    size = scene.image.shape[0]
    colour = _DEFECT_COLOURS[category][kind]
    for _ in range(50):  # resample until the defect is big enough to see
        paint = _paint_region(kind, rng, scene)
        if colour is None:
            fill = scene.background
        else:
            fill = _finish(np.broadcast_to(np.asarray(colour, float), scene.image.shape), rng, 6.0)
        defective = np.where(paint[..., None], fill, scene.image)
        mask = (defective != scene.image).any(axis=2)
        if mask.sum() >= (0.01 if kind == "crack" else 0.02) * size * size:
            return defective, mask
    raise RuntimeError(f"demo generator could not place a {kind} defect on {category}")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG atomically (tmp file + rename) so concurrent readers never see half files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    Image.fromarray(array).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _write_demo_image(root: Path, category: str, split: str, index: int, image_size: int, seed: int) -> None:
    """Generate and write one demo image (and its mask); its own RNG makes it reproducible."""
    rng = np.random.default_rng([seed, DEMO_CATEGORIES.index(category), _SPLIT_CODES[split], index])
    base = root / category
    scene = _GENERATORS[category](rng, image_size)
    if split == "train":
        _save_png(scene.image, base / "train" / "good" / f"{index:03d}.png")
    elif split == "test_good":
        _save_png(scene.image, base / "test" / "good" / f"{index:03d}.png")
    else:
        kinds = DEMO_DEFECTS[category]
        kind, number = kinds[index % len(kinds)], index // len(kinds)
        defective, mask = _make_defect(category, kind, rng, scene)
        _save_png(defective, base / "test" / kind / f"{number:03d}.png")
        _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / kind / f"{number:03d}_mask.png")


def _settings(
    categories: Sequence[str],
    image_size: int,
    n_train: int,
    n_test_good: int,
    n_test_defect: int,
    seed: int,
) -> dict[str, object]:
    return {
        "version": DEMO_VERSION,
        "categories": list(categories),
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "seed": seed,
    }


def _check_categories(categories: Sequence[str] | None) -> list[str]:
    if categories is None:
        return list(DEMO_CATEGORIES)
    if isinstance(categories, str):
        categories = [categories]
    unknown = [c for c in categories if c not in DEMO_CATEGORIES]
    if unknown:
        raise KdadError(f"unknown demo categories {', '.join(unknown)}; choose from {', '.join(DEMO_CATEGORIES)}")
    return list(categories)


def generate_demo_dataset(
    root: str | Path,
    categories: Sequence[str] | None = None,
    image_size: int = 256,
    n_train: int = 80,
    n_test_good: int = 16,
    n_test_defect: int = 24,
    seed: int = 0,
) -> Path:
    """Write the demo set to ``root`` in MVTec AD layout and return ``root``.

    Per category: ``n_train`` images in ``train/good``, ``n_test_good`` in ``test/good`` and
    ``n_test_defect`` defective images spread round-robin over the category's defect kinds
    (``test/<kind>/NNN.png`` with ``ground_truth/<kind>/NNN_mask.png``, 0/255). A category
    folder already in ``root`` is replaced only if ``root`` holds a demo marker file
    (i.e. kdad wrote it); otherwise a KdadError refuses to overwrite it.
    """
    cats = _check_categories(categories)
    if image_size < 32:
        raise KdadError(f"demo image_size={image_size} is too small; use at least 32")
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER_NAME
    for cat in cats:
        folder = root / cat
        if folder.exists():
            if not marker.exists():
                raise KdadError(
                    f"{folder} exists but was not written by kdad's demo generator; "
                    "choose an empty folder for the demo set"
                )
            shutil.rmtree(folder)
    settings = _settings(cats, image_size, n_train, n_test_good, n_test_defect, seed)
    marker.write_text(json.dumps({**settings, "complete": False}, indent=1))

    jobs = [
        (cat, split, i)
        for cat in cats
        for split, count in (("train", n_train), ("test_good", n_test_good), ("test_defect", n_test_defect))
        for i in range(count)
    ]

    def run(job: tuple[str, str, int]) -> None:
        _write_demo_image(root, *job, image_size=image_size, seed=seed)

    # numpy, PIL drawing and zlib release the GIL: threads give a real speed-up
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        list(pool.map(run, jobs))

    marker.write_text(json.dumps({**settings, "complete": True}, indent=1))
    return root


def ensure_demo_dataset(
    root: str | Path | None = None,
    categories: Sequence[str] | None = None,
    image_size: int | None = None,
    n_train: int | None = None,
    n_test_good: int | None = None,
    n_test_defect: int | None = None,
    seed: int | None = None,
) -> Path:
    """Generate the demo set on first use; skip when ``root`` already holds a complete one.

    ``<root>/.kdad_demo.json`` records the generator version and settings, and is marked
    complete only after the last file is written. A complete set of the current version is
    kept when every setting given here (not ``None``) matches it; ``categories`` must be a
    subset of the recorded ones. Otherwise the set is (re)generated with the given settings
    and :func:`generate_demo_dataset`'s defaults for the rest. ``root=None`` uses
    :func:`default_demo_root`.
    """
    root = default_demo_root() if root is None else Path(root).expanduser()
    cats = None if categories is None else _check_categories(categories)
    given = {
        "image_size": image_size,
        "n_train": n_train,
        "n_test_good": n_test_good,
        "n_test_defect": n_test_defect,
        "seed": seed,
    }
    given = {k: v for k, v in given.items() if v is not None}
    marker = root / MARKER_NAME
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = {}
        if (
            recorded.get("complete") is True
            and recorded.get("version") == DEMO_VERSION
            and all(recorded.get(k) == v for k, v in given.items())
            and (cats is None or set(cats) <= set(recorded.get("categories", [])))
        ):
            return root
    return generate_demo_dataset(root, cats, **given)  # type: ignore[arg-type]
