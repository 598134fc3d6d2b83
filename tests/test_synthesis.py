"""Synthetic anomalies (kdad.data.synthesis): Perlin noise, rotation, blending, textures,
foreground masks and their cache, the (seed, epoch, index) data flow, the preview picture."""

from __future__ import annotations

import gc
import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from kdad.callbacks import SyntheticAnomalyPreview
from kdad.data import (
    AnomalyDataModule,
    AnomalySynthesizer,
    EpochKeySampler,
    TextureFolder,
    collate,
    perlin_noise,
    resolve_foreground,
    sample_rng,
    synthesis,
)
from kdad.data.synthesis import (
    DRAEM_TEXTURE_OPS,
    blend_anomaly,
    draem_texture_augment,
    grabcut_foreground,
    otsu_inv_foreground,
    perlin_mask,
    random_perlin_noise,
    rotate_array,
)
from kdad.errors import KdadError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Foreground masks go to a per-test cache, never to ~/.cache."""
    monkeypatch.setenv("KDAD_CACHE", str(tmp_path / "kdad_cache"))


# ------------------------------------------------------------------------------------ Perlin


def _slow_perlin(shape: tuple[int, int], res: tuple[int, int], seed: int) -> np.ndarray:
    """Textbook gradient noise, pixel by pixel (same gradient draws as kdad's)."""
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0.0, 2.0 * math.pi, size=(res[0] + 1, res[1] + 1))
    cell = (math.ceil(shape[0] / res[0]), math.ceil(shape[1] / res[1]))

    def fade(t: float) -> float:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    out = np.zeros(shape)
    for r in range(shape[0]):
        for c in range(shape[1]):
            y, x = r / cell[0], c / cell[1]
            y0, x0 = math.floor(y), math.floor(x)
            dots = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    a = angles[y0 + dy, x0 + dx]
                    dots[dy, dx] = math.cos(a) * (y - y0 - dy) + math.sin(a) * (x - x0 - dx)
            u, v = fade(y - y0), fade(x - x0)
            left = dots[0, 0] * (1 - u) + dots[1, 0] * u
            right = dots[0, 1] * (1 - u) + dots[1, 1] * u
            out[r, c] = math.sqrt(2) * (left * (1 - v) + right * v)
    return out


def test_perlin_noise_matches_a_slow_reference() -> None:
    for shape, res in (((20, 12), (2, 3)), ((13, 9), (4, 2))):  # divisible and not
        got = perlin_noise(shape, res, np.random.default_rng(7))
        assert got.shape == shape and got.dtype == np.float32
        np.testing.assert_allclose(got, _slow_perlin(shape, res, 7), atol=1e-5)


def test_perlin_noise_range_determinism_lattice_zeros_and_crop() -> None:
    noise = perlin_noise((48, 40), (4, 8), np.random.default_rng(0))
    assert noise.shape == (48, 40) and np.abs(noise).max() <= 1.0 and noise.std() > 0.1
    np.testing.assert_array_equal(noise, perlin_noise((48, 40), (4, 8), np.random.default_rng(0)))
    assert not np.array_equal(noise, perlin_noise((48, 40), (4, 8), np.random.default_rng(1)))
    # gradient noise is 0 on lattice points: cells are 12 x 5 pixels here
    assert np.all(noise[::12, ::5] == 0.0)
    assert np.abs(noise[6::12, 2::5]).max() > 0.05
    # a size not divisible by the scale = the larger, divisible noise cropped
    big = perlin_noise((52, 32), (4, 8), np.random.default_rng(3))
    np.testing.assert_array_equal(perlin_noise((50, 30), (4, 8), np.random.default_rng(3)), big[:50, :30])


def test_perlin_scales_cover_the_inclusive_exponent_range(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    real = synthesis.perlin_noise

    def spy(shape, res, rng):  # type: ignore[no-untyped-def]
        seen.append(res)
        return real(shape, res, rng)

    monkeypatch.setattr(synthesis, "perlin_noise", spy)
    rng = np.random.default_rng(0)
    for _ in range(300):
        random_perlin_noise((8, 8), (0, 5), rng)
    assert {r[0] for r in seen} == {1, 2, 4, 8, 16, 32} == {r[1] for r in seen}


# ------------------------------------------------------------------------------------ rotation


def _reference_rotation(image: np.ndarray, angle: float) -> np.ndarray:
    """Counter-clockwise (as displayed) rotation about ((W-1)/2, (H-1)/2): inverse mapping,
    bilinear, zero outside."""
    h, w = image.shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    t = math.radians(angle)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    sx = math.cos(t) * dx - math.sin(t) * dy + cx
    sy = math.sin(t) * dx + math.cos(t) * dy + cy
    padded = np.pad(image.astype(np.float64), 1)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0

    def at(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        r, c = np.clip(r + 1, 0, h + 1), np.clip(c + 1, 0, w + 1)
        return padded[r, c]

    return (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x0 + 1)) + fy * (
        (1 - fx) * at(y0 + 1, x0) + fx * at(y0 + 1, x0 + 1)
    )


def test_rotation_of_a_known_mask() -> None:
    mask = np.zeros((7, 7), np.float32)
    mask[0, 1:6] = 1.0  # a bar along the top
    mask[1, 1] = 1.0
    np.testing.assert_allclose(rotate_array(mask, 90.0), np.rot90(mask, 1), atol=1e-6)  # top -> left
    np.testing.assert_allclose(rotate_array(mask, -90.0), np.rot90(mask, -1), atol=1e-6)
    np.testing.assert_allclose(rotate_array(mask, 180.0), mask[::-1, ::-1], atol=1e-6)
    # a smooth blob at 37 degrees against an independent bilinear reference (zero border)
    yy, xx = np.mgrid[0:33, 0:41]
    blob = np.exp(-((yy - 10.0) ** 2 + (xx - 28.0) ** 2) / 60.0).astype(np.float32)
    got = rotate_array(blob, 37.0)
    assert got.shape == blob.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_rotation(blob, 37.0), atol=0.02)
    # image rotation (DRAEM): uint8 HxWx3 keeps shape/dtype, corners become 0 (constant border)
    image = np.full((32, 32, 3), 200, np.uint8)
    rotated = rotate_array(image, 45.0)
    assert rotated.shape == image.shape and rotated.dtype == np.uint8
    assert rotated[0, 0].tolist() == [0, 0, 0] and rotated[16, 16].tolist() == [200, 200, 200]


def test_perlin_mask_is_thresholded_rotated_noise() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 6, size=2)
    noise = perlin_noise((64, 64), (2 ** int(a), 2 ** int(b)), rng)
    angle = rng.uniform(-30.0, 30.0)
    expected = rotate_array(noise, angle) > 0.3
    got = perlin_mask((64, 64), np.random.default_rng(5), (0, 5), threshold=0.3, rotate_deg=30.0)
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == bool


# ------------------------------------------------------------------------------------ blending


def test_blend_formula_on_constant_images() -> None:
    image = np.full((4, 4, 3), 0.2, np.float32)
    texture = np.full((4, 4, 3), 0.8, np.float32)
    mask = np.zeros((4, 4), bool)
    mask[1:3, 2:] = True
    out = blend_anomaly(image, texture, mask, beta=0.25)
    # inside: (1 - 0.25) * 0.8 + 0.25 * 0.2 = 0.65; outside: the image
    np.testing.assert_allclose(out[mask], 0.65, atol=1e-6)
    np.testing.assert_allclose(out[~mask], 0.2, atol=1e-6)


def _write_texture_folder(root: Path, colours: list[tuple[int, int, int]]) -> Path:
    for i, colour in enumerate(colours):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((30, 20, 3), colour, np.uint8)).save(folder / f"t{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_synthesizer_blends_texture_and_image_with_the_drawn_beta(tmp_path: Path) -> None:
    textures = _write_texture_folder(tmp_path / "tex", [(200, 200, 200)])
    image = torch.full((3, 64, 64), 51, dtype=torch.uint8)  # 0.2
    synth = AnomalySynthesizer(texture_source=str(textures), foreground="none", beta_max=0.6)
    masks = 0
    for seed in range(6):
        aug, mask = synth(image, None, np.random.default_rng(seed))
        assert aug.shape == (3, 64, 64) and aug.dtype == torch.float32
        assert mask.shape == (1, 64, 64) and set(mask.unique().tolist()) <= {0.0, 1.0}
        inside = mask[0].bool()
        torch.testing.assert_close(aug[:, ~inside], torch.full_like(aug[:, ~inside], 0.2))
        if inside.any():
            masks += 1
            values = aug[:, inside]
            assert torch.allclose(values, values[0, 0])  # one beta per sample
            beta = (200 / 255 - float(values[0, 0])) / (200 / 255 - 0.2)  # aug = (1-b) t + b x
            assert 0.0 <= beta <= 0.6 + 1e-5
    assert masks >= 3


def test_probability_zero_gives_the_clean_image_and_empty_masks() -> None:
    synth = AnomalySynthesizer(probability=0.0, foreground="none")
    image = torch.randint(0, 256, (3, 32, 40), dtype=torch.uint8)
    for seed in range(5):
        aug, mask = synth(image, None, np.random.default_rng(seed))
        torch.testing.assert_close(aug, image.float() / 255)
        assert mask.shape == (1, 32, 40) and mask.sum() == 0


def test_image_rotation_applies_to_the_augmented_view_and_its_foreground() -> None:
    synth = AnomalySynthesizer(probability=0.0, rotate_image_probability=1.0, foreground="none")
    image = torch.full((3, 33, 33), 204, dtype=torch.uint8)
    rng = np.random.default_rng(2)
    aug, mask = synth(image, None, rng)
    ref_rng = np.random.default_rng(2)
    ref_rng.random()
    expected = rotate_array(image.permute(1, 2, 0).numpy(), ref_rng.uniform(-90.0, 90.0))
    torch.testing.assert_close(aug, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
    assert mask.sum() == 0 and aug[:, 0, 0].sum() == 0  # black corner from the rotation
    # with anomalies, the mask stays inside the rotated foreground
    synth = AnomalySynthesizer(
        rotate_image_probability=1.0, foreground="grabcut", perlin_scale_exp=(1, 2), threshold=0.1
    )
    foreground = torch.zeros(33, 33, dtype=torch.bool)
    foreground[:, :16] = True
    for seed in range(5):
        _, mask = synth(image, foreground, np.random.default_rng(seed))
        r = np.random.default_rng(seed)
        r.random()
        rotated = rotate_array(foreground.numpy().astype(np.uint8), r.uniform(-90, 90), cv2.INTER_NEAREST)
        assert not (mask[0].numpy().astype(bool) & ~rotated.astype(bool)).any()


def test_mask_stays_inside_the_foreground() -> None:
    synth = AnomalySynthesizer(foreground="grabcut", perlin_scale_exp=(1, 3), threshold=0.2)
    image = torch.full((3, 48, 48), 120, dtype=torch.uint8)
    foreground = torch.zeros(48, 48, dtype=torch.bool)
    foreground[8:40, 4:30] = True
    total = 0
    for seed in range(10):
        aug, mask = synth(image, foreground, np.random.default_rng(seed))
        assert mask[0][~foreground].sum() == 0
        torch.testing.assert_close(aug[:, ~foreground], torch.full_like(aug[:, ~foreground], 120 / 255))
        total += int(mask.sum())
    assert total > 0


# ------------------------------------------------------------------------------------ foreground


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_grabcut_finds_a_bright_disc_on_a_dark_background() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 <= 16**2
    image = np.where(disc[..., None], 215.0, 35.0) + rng.normal(0, 6, (64, 64, 3))
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    found = grabcut_foreground(rgb)
    assert found.dtype == bool and _iou(found, disc) > 0.8


def test_otsu_inv_finds_a_dark_object_on_a_bright_background() -> None:
    rng = np.random.default_rng(1)
    obj = np.zeros((64, 64), bool)
    obj[20:44, 10:30] = True
    image = np.where(obj[..., None], 40.0, 210.0) + rng.normal(0, 8, (64, 64, 3))
    found = otsu_inv_foreground(np.clip(image, 0, 255).astype(np.uint8))
    assert _iou(found, obj) > 0.95


def test_auto_foreground_table() -> None:
    expected = {
        ("mvtec", "bottle"): "grabcut",
        ("mvtec", "zipper"): "grabcut",
        ("mvtec", "capsule"): "otsu_inv",
        ("mvtec", "screw"): "otsu_inv",
        ("mvtec", "transistor"): "none",
        ("mvtec", "carpet"): "none",
        ("mvtec", "unknown"): "none",
        ("visa", "pcb1"): "grabcut",
        ("mpdd", "tubes"): "grabcut",
        ("btad", "01"): "none",
        ("demo", "washer"): "grabcut",
        ("demo", "pill"): "grabcut",
        ("demo", "weave"): "none",
        ("folder", "bottle"): "none",
        ("ksdd2", "ksdd2"): "none",
    }
    for (fmt, category), mode in expected.items():
        assert resolve_foreground("auto", fmt, category) == mode, (fmt, category)
    assert resolve_foreground("otsu_inv", "mvtec", "bottle") == "otsu_inv"
    assert resolve_foreground("none", "visa", "pcb1") == "none"


def test_foreground_masks_are_cached_on_disk(demo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = cv2.grabCut

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cv2, "grabCut", counting)

    def setup() -> AnomalyDataModule:
        dm = AnomalyDataModule(
            format="demo", root=str(demo_root), category="washer", image_size=64, synthesis={"foreground": "auto"}
        )
        dm.setup("fit")
        return dm

    first = setup()
    assert first.foreground_mode == "grabcut" and len(calls) == 8
    fg = first.train_foreground
    assert fg is not None and fg.shape == (8, 64, 64) and fg.dtype == torch.bool
    assert 0.15 < fg.float().mean() < 0.6  # the washer, not the whole image
    second = setup()
    assert len(calls) == 8, "second setup must read the disk cache"
    assert torch.equal(second.train_foreground, fg)
    cached = sorted((tmp_path / "kdad_cache" / "foreground").rglob("*.png"))
    assert len(cached) == 8
    cached[0].write_bytes(b"not a png")  # unreadable -> recomputed
    third = setup()
    assert len(calls) == 9 and torch.equal(third.train_foreground, fg)
    first.setup("fit")  # setup again: nothing recomputed
    assert len(calls) == 9


# ------------------------------------------------------------------------------------ textures


def test_texture_folder_source_and_its_errors(tmp_path: Path) -> None:
    root = _write_texture_folder(tmp_path / "dtd" / "images", [(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    folder = TextureFolder(root)
    assert len(folder) == 3
    assert [p.name for p in folder.paths] == ["t0.png", "t2.png", "t1.png"]  # sorted paths
    texture = folder.load(2, (16, 24))
    assert texture.shape == (16, 24, 3) and texture.dtype == np.uint8
    assert texture[8, 12].tolist() == [0, 255, 0]
    with pytest.raises(KdadError, match="anomaly_source") as missing:
        AnomalySynthesizer(texture_source=str(tmp_path / "nowhere"))
    assert "\n" not in str(missing.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(KdadError, match=r"anomaly_source.*no images"):
        TextureFolder(empty)
    with pytest.raises(KdadError, match="anomaly_source"):
        AnomalyDataModule(
            format="demo", root=str(tmp_path), category="weave", synthesis={"texture_source": str(tmp_path / "nowhere")}
        )


def test_procedural_textures_are_varied_and_deterministic() -> None:
    textures = [synthesis.procedural_texture((32, 32), np.random.default_rng(i)) for i in range(8)]
    assert all(t.shape == (32, 32, 3) and t.dtype == np.uint8 for t in textures)
    np.testing.assert_array_equal(textures[0], synthesis.procedural_texture((32, 32), np.random.default_rng(0)))
    means = np.array([t.reshape(-1, 3).mean(0) for t in textures])
    assert means.std(0).min() > 15  # different colours
    assert all(t.std() > 5 for t in textures)  # not flat


def test_draem_texture_augment_changes_textures_and_stays_in_range() -> None:
    texture = synthesis.procedural_texture((32, 32), np.random.default_rng(3))
    out = draem_texture_augment(texture, np.random.default_rng(0))
    assert out.shape == texture.shape and out.dtype == np.uint8
    assert not np.array_equal(out, texture)
    np.testing.assert_array_equal(out, draem_texture_augment(texture, np.random.default_rng(0)))
    ops = synthesis._draem_ops()
    assert tuple(ops) == DRAEM_TEXTURE_OPS and len(ops) == 10
    for name, op in ops.items():
        result = op(texture, np.random.default_rng(1))
        assert result.shape == texture.shape and result.dtype == np.uint8, name
    np.testing.assert_array_equal(ops["invert"](texture, np.random.default_rng(0)), 255 - texture)
    synth = AnomalySynthesizer(texture_augment="draem", foreground="none")
    aug, _ = synth(torch.full((3, 32, 32), 128, dtype=torch.uint8), None, np.random.default_rng(4))
    assert float(aug.min()) >= 0.0 and float(aug.max()) <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"probability": 1.5}, "probability"),
        ({"beta_max": -0.1}, "beta_max"),
        ({"rotate_image_probability": "x"}, "rotate_image_probability"),
        ({"foreground": "mask"}, "foreground"),
        ({"texture_augment": "imgaug"}, "texture_augment"),
        ({"perlin_scale_exp": [3, 1]}, "perlin_scale_exp"),
        ({"perlin_scale_exp": [0]}, "perlin_scale_exp"),
        ({"threshold": 1.5}, "threshold"),
        ({"rotate_deg": -5}, "rotate_deg"),
    ],
)
def test_invalid_arguments_raise_one_line_errors(kwargs: dict, key: str) -> None:
    with pytest.raises(KdadError, match=key) as err:
        AnomalySynthesizer(**kwargs)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ data flow


def _datamodule(root: Path, **kwargs: object) -> AnomalyDataModule:
    options = {
        "format": "mvtec",
        "root": str(root),
        "category": "alpha",
        "image_size": 32,
        "train_batch_size": 4,
        "seed": 5,
        "synthesis": {"foreground": "none", "perlin_scale_exp": [1, 3]},
    }
    options.update(kwargs)
    return AnomalyDataModule(**options)  # type: ignore[arg-type]


def _epoch(loader: torch.utils.data.DataLoader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    return list(loader)


def _same(a: list, b: list) -> bool:
    return all(
        x.path == y.path and torch.equal(x.aug_image, y.aug_image) and torch.equal(x.aug_mask, y.aug_mask)
        for x, y in zip(a, b, strict=True)
    )


def test_training_batches_carry_the_synthetic_view(tiny_mvtec: Path) -> None:
    dm = _datamodule(tiny_mvtec)
    batches = _epoch(dm.train_dataloader(), 0)
    assert sum(len(b) for b in batches) == 6
    batch = batches[0]
    assert batch.image.dtype == torch.uint8 and batch.aug_image.dtype == torch.float32
    assert batch.aug_image.shape == (4, 3, 32, 32) and batch.aug_mask.shape == (4, 1, 32, 32)
    assert float(batch.aug_image.min()) >= 0 and float(batch.aug_image.max()) <= 1
    # the sample keyed (index, epoch) is exactly the dataset's item for that key
    index = dm.train_dataset.paths.index(batch.path[1])
    item = dm.synthetic_train_dataset[(index, 0)]
    assert torch.equal(item["aug_image"], batch.aug_image[1]) and torch.equal(item["image"], batch.image[1])
    assert dm.test_dataloader().dataset is dm.test_dataset
    assert next(iter(dm.test_dataloader())).aug_image is None
    plain = AnomalyDataModule(format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=32)
    assert plain.synthesis is None and next(iter(plain.train_dataloader())).aug_image is None
    assert isinstance(dm.synthesis, AnomalySynthesizer)


def test_same_seed_same_batches_other_epoch_other_batches(tiny_mvtec: Path) -> None:
    first = _epoch(_datamodule(tiny_mvtec).train_dataloader(), 0)
    again = _epoch(_datamodule(tiny_mvtec).train_dataloader(), 0)
    assert _same(first, again)
    # unrelated global random draws change nothing
    np.random.seed(123)
    torch.manual_seed(123)
    loader = _datamodule(tiny_mvtec).train_dataloader()
    np.random.rand(10)
    torch.rand(10)
    assert _same(first, _epoch(loader, 0))
    second = _epoch(loader, 1)

    def by_path(batches: list) -> dict[str, torch.Tensor]:
        return {p: aug for b in batches for p, aug in zip(b.path, b.aug_image)}

    epoch0, epoch1 = by_path(first), by_path(second)
    assert epoch0.keys() == epoch1.keys() and len(epoch0) == 6
    assert all(not torch.equal(epoch0[p], epoch1[p]) for p in epoch0)  # new anomalies per epoch
    assert [p for b in first for p in b.path] != [p for b in second for p in b.path]  # new order
    other_seed = _epoch(_datamodule(tiny_mvtec, seed=6).train_dataloader(), 0)
    assert not torch.equal(first[0].aug_image, other_seed[0].aug_image)
    # each sample draws from default_rng([seed, epoch, index]) alone
    dataset = _datamodule(tiny_mvtec).synthetic_train_dataset
    aug, _ = dataset.synthesizer(dataset.base[2]["image"], None, np.random.default_rng([5, 1, 2]))
    assert sample_rng(5, 1, 2).random() == np.random.default_rng([5, 1, 2]).random()
    assert torch.equal(aug, dataset[(2, 1)]["aug_image"])


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    sampler = EpochKeySampler(10, seed=3)
    sampler.set_epoch(4)
    keys = list(sampler)
    assert sorted(i for i, _ in keys) == list(range(10)) and {e for _, e in keys} == {4}
    again = EpochKeySampler(10, seed=3)
    again.set_epoch(4)
    assert list(again) == keys
    assert [e for _, e in list(sampler)] == [5] * 10  # without set_epoch the next pass is the next epoch
    sampler.set_epoch(0)
    assert [i for i, _ in sampler] != [i for i, _ in keys]


@pytest.mark.slow
def test_worker_processes_give_identical_batches(tiny_mvtec: Path) -> None:
    serial = _datamodule(tiny_mvtec, num_workers=0).train_dataloader()
    parallel = _datamodule(tiny_mvtec, num_workers=2).train_dataloader()
    for epoch in (0, 1):
        assert _same(_epoch(serial, epoch), _epoch(parallel, epoch))
    del parallel
    gc.collect()  # stop the persistent workers now


class _Recorder(L.LightningModule):
    """Records the synthetic views it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[tuple[int, str], torch.Tensor] = {}

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        for path, aug in zip(batch.path, batch.aug_image):
            self.seen[(self.current_epoch, path)] = aug.clone()
        return (self.weight * batch.aug_image.mean()).sum()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_fit_sets_the_epoch_and_writes_the_preview(tiny_mvtec: Path, tmp_path: Path) -> None:
    dm = _datamodule(tiny_mvtec)
    model = _Recorder()
    preview = SyntheticAnomalyPreview(num_images=3)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[preview],
    )
    trainer.fit(model, datamodule=dm)
    dataset = dm.synthetic_train_dataset
    assert len(model.seen) == 12
    for index, path in enumerate(dm.train_dataset.paths):
        for epoch in (0, 1):
            assert torch.equal(model.seen[(epoch, path)], dataset[(index, epoch)]["aug_image"])
    assert preview.path == tmp_path / "synthetic_anomalies.png"
    with Image.open(preview.path) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_preview_callback_writes_a_png_only_with_synthesis(tiny_mvtec: Path, tmp_path: Path) -> None:
    callback = SyntheticAnomalyPreview(num_images=2, filename="syn.png")
    plain = AnomalyDataModule(format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=32)
    trainer = SimpleNamespace(datamodule=plain, is_global_zero=True, default_root_dir=str(tmp_path / "a"))
    callback.on_fit_start(trainer, None)  # type: ignore[arg-type]
    assert callback.path is None and not (tmp_path / "a").exists()
    trainer = SimpleNamespace(
        datamodule=_datamodule(tiny_mvtec), is_global_zero=True, default_root_dir=str(tmp_path / "b")
    )
    callback.on_fit_start(trainer, None)  # type: ignore[arg-type]
    with Image.open(tmp_path / "b" / "syn.png") as img:
        assert img.format == "PNG"


def test_collate_stacks_synthetic_items(tiny_mvtec: Path) -> None:
    dataset = _datamodule(tiny_mvtec).synthetic_train_dataset
    batch = collate([dataset[(0, 0)], dataset[(1, 0)], dataset[2]])
    assert batch.aug_image.shape == (3, 3, 32, 32) and batch.aug_mask.shape == (3, 1, 32, 32)
    assert torch.equal(batch.aug_image[2], dataset[(2, 0)]["aug_image"])  # an int key is epoch 0


def test_train_config_passes_anomaly_source_to_the_synthesizer(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    from kdad.config import config_dir, instantiate_datamodule, register_resolvers

    register_resolvers()
    textures = _write_texture_folder(tmp_path / "textures", [(10, 20, 30)])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(config_dir())), version_base="1.3"):
        cfg = compose(
            config_name="train", overrides=[f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path}/data"]
        )
    assert cfg.anomaly_source is None
    with open_dict(cfg):
        cfg.data.synthesis = {"texture_source": "${anomaly_source}", "foreground": "auto"}
    assert instantiate_datamodule(cfg.data).synthesis.textures is None  # null -> procedural
    cfg.anomaly_source = str(textures)
    synth = instantiate_datamodule(cfg.data).synthesis
    assert synth.textures is not None and len(synth.textures) == 1
