"""Shared fixtures: tiny datasets written into temporary folders (no downloads, ever).

``demo_root``   a small copy of kdad's built-in demo set (the generator users run).
``tiny_mvtec``  a hand-made two-category MVTec-AD-layout dataset with known square defects.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdad.data.demo import generate_demo_dataset

#: Settings of the ``demo_root`` fixture.
DEMO_FIXTURE_SETTINGS = {
    "image_size": 64,
    "n_train": 8,
    "n_test_good": 4,
    "n_test_defect": 4,
    "seed": 0,
}

TINY_SIZE = 64
TINY_SQUARE = 8
TINY_N_TRAIN = 6
TINY_N_GOOD = 2
TINY_N_DEFECT = 2


def tiny_square(index: int) -> tuple[int, int]:
    """Top-left (row, col) of the defect square in ``test/<defect>/<index:03d>.png``."""
    return 16 + 16 * index, 16 + 24 * index


def _tiny_normal(rng: np.random.Generator, grey: bool) -> np.ndarray:
    x = np.linspace(60.0, 180.0, TINY_SIZE)[None, :].repeat(TINY_SIZE, 0)
    noise = rng.normal(0.0, 3.0, size=(TINY_SIZE, TINY_SIZE))
    if grey:
        return np.clip(np.rint(x + noise), 0, 255).astype(np.uint8)
    rgb = np.stack([x, np.full_like(x, 100.0), np.full_like(x, 140.0)], axis=2)
    return np.clip(np.rint(rgb + noise[..., None]), 0, 255).astype(np.uint8)


def write_tiny_mvtec(root: Path) -> Path:
    """Write the ``tiny_mvtec`` dataset (see the fixture's docstring) into ``root``."""
    spec = {"alpha": ("spot", False, (255, 255, 0)), "beta": ("hole", True, 0)}
    for category, (defect, grey, colour) in spec.items():
        rng = np.random.default_rng(0 if category == "alpha" else 1)
        base = root / category
        for folder, count in (("train/good", TINY_N_TRAIN), ("test/good", TINY_N_GOOD)):
            (base / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_tiny_normal(rng, grey)).save(base / folder / f"{i:03d}.png")
        (base / "test" / defect).mkdir(parents=True)
        (base / "ground_truth" / defect).mkdir(parents=True)
        for i in range(TINY_N_DEFECT):
            image = _tiny_normal(rng, grey)
            mask = np.zeros((TINY_SIZE, TINY_SIZE), np.uint8)
            r, c = tiny_square(i)
            image[r : r + TINY_SQUARE, c : c + TINY_SQUARE] = colour
            mask[r : r + TINY_SQUARE, c : c + TINY_SQUARE] = 255
            Image.fromarray(image).save(base / "test" / defect / f"{i:03d}.png")
            Image.fromarray(mask).save(base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo set in MVTec AD layout (session-scoped; do not modify it).

    Made by the same :func:`kdad.data.generate_demo_dataset` that users run, with
    :data:`DEMO_FIXTURE_SETTINGS`: 64x64 RGB images; for each category of
    ``kdad.data.DEMO_CATEGORIES`` (weave, marble, washer, pill) 8 ``train/good`` images,
    4 ``test/good`` images and 4 defective test images, one per defect kind of
    ``kdad.data.DEMO_DEFECTS[category]`` (``test/<kind>/000.png`` with
    ``ground_truth/<kind>/000_mask.png``, 0/255). A complete marker file is present, so
    ``ensure_demo_dataset(demo_root)`` and ``AnomalyDataModule(format="demo",
    root=demo_root)`` use it as is.
    """
    root = tmp_path_factory.mktemp("demo")
    return generate_demo_dataset(root, **DEMO_FIXTURE_SETTINGS)


@pytest.fixture(scope="session")
def tiny_mvtec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-made MVTec-AD-layout dataset with two categories (session-scoped; read only).

    All images are 64x64 PNG: a horizontal ramp (60 -> 180) plus Gaussian noise (std 3).

    * ``alpha`` (RGB, channels ramp/100/140): ``train/good/000..005.png`` (6),
      ``test/good/000..001.png`` (2), ``test/spot/000..001.png`` (2) where an 8x8 square
      is painted pure yellow (255, 255, 0).
    * ``beta`` (greyscale, mode L; readers give RGB): same counts, defect folder
      ``test/hole`` with the 8x8 square painted black (0).

    The square of ``test/<defect>/00k.png`` covers rows ``16+16k .. 23+16k`` and columns
    ``16+24k .. 23+24k`` (k=0: rows/cols 16..23; k=1: rows 32..39, cols 40..47), and
    ``ground_truth/<defect>/00k_mask.png`` is 255 exactly there, 0 elsewhere.
    """
    return write_tiny_mvtec(tmp_path_factory.mktemp("tiny_mvtec"))
