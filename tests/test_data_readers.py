"""Readers for every layout, the decoded masks they lead to, and every user-facing error."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdad.data import (
    CachedImageDataset,
    Sample,
    collate,
    read_btad,
    read_folder,
    read_mvtec,
    read_visa,
)
from kdad.errors import KdadError

SIZE = 32


def _square(index: int) -> tuple[int, int]:
    """Top-left (row, col) of tiny_mvtec's defect square k (see conftest)."""
    return 16 + 16 * index, 16 + 24 * index


def _write(path: Path, array: np.ndarray, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def _image(seed: int, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _mask(value: int, box: tuple[int, int, int, int], size: tuple[int, int] = (SIZE, SIZE)):
    """A mask of ``size`` with ``value`` in rows box[0]:box[1], cols box[2]:box[3]."""
    m = np.zeros(size, np.uint8)
    m[box[0] : box[1], box[2] : box[3]] = value
    return m


# ------------------------------------------------------------------------------ MVTec
def test_read_mvtec_train_and_test(tiny_mvtec: Path) -> None:
    train = read_mvtec(tiny_mvtec, "alpha", "train")
    assert [s.image_path.name for s in train] == [f"{i:03d}.png" for i in range(6)]
    assert all(s.label == 0 and s.mask_path is None and s.defect == "good" for s in train)

    test = read_mvtec(tiny_mvtec, "alpha", "test")
    assert [(s.defect, s.label, s.image_path.name) for s in test] == [
        ("good", 0, "000.png"),
        ("good", 0, "001.png"),
        ("spot", 1, "000.png"),
        ("spot", 1, "001.png"),
    ]
    assert test[2].mask_path == tiny_mvtec / "alpha/ground_truth/spot/000_mask.png"
    assert test[3].mask_path == tiny_mvtec / "alpha/ground_truth/spot/001_mask.png"
    assert read_mvtec(tiny_mvtec, "alpha", "test") == test  # deterministic
    assert isinstance(test[0], Sample)
    with pytest.raises(dataclasses.FrozenInstanceError):
        test[0].label = 1  # type: ignore[misc]


def test_mvtec_masks_and_greyscale_decode(tiny_mvtec: Path) -> None:
    test = read_mvtec(tiny_mvtec, "beta", "test")
    native = CachedImageDataset(test, image_size=64)
    # greyscale becomes three identical channels holding the file's values
    grey = np.array(Image.open(test[0].image_path))
    assert grey.ndim == 2
    assert native.images.shape == (4, 3, 64, 64) and native.images.dtype == torch.uint8
    for c in range(3):
        assert torch.equal(native.images[0, c], torch.from_numpy(grey))
    # masks at the native size equal the hand-made squares
    for k in range(2):
        r, c = _square(k)
        expected = torch.zeros(1, 64, 64, dtype=torch.uint8)
        expected[:, r : r + 8, c : c + 8] = 1
        assert torch.equal(native.masks[2 + k], expected)
    assert native.masks[0].sum() == 0 and native.masks[1].sum() == 0

    # 64 -> 32: an 8x8 square at even offsets becomes exactly the 4x4 square at half
    # coordinates (bilinear antialias weights 1/8,3/8,3/8,1/8: inside 7/8 vs 1/8 at edges)
    half = CachedImageDataset(test, image_size=32)
    # 64 -> 128: exactly the doubled square (edge pixels interpolate 0.75 inside, 0.25 out)
    double = CachedImageDataset(test, image_size=[128, 128])
    for k in range(2):
        r, c = _square(k)
        exp_half = torch.zeros(1, 32, 32, dtype=torch.uint8)
        exp_half[:, r // 2 : r // 2 + 4, c // 2 : c // 2 + 4] = 1
        assert torch.equal(half.masks[2 + k], exp_half)
        exp_double = torch.zeros(1, 128, 128, dtype=torch.uint8)
        exp_double[:, 2 * r : 2 * r + 16, 2 * c : 2 * c + 16] = 1
        assert torch.equal(double.masks[2 + k], exp_double)


def test_mvtec_custom_extensions_and_mask_pattern(tmp_path: Path) -> None:
    base = tmp_path / "cat"
    _write(base / "train/good/a.JPG", _image(0), "JPEG")
    _write(base / "train/good/b.bmp", _image(1), "BMP")
    _write(base / "train/good/notes.txt.png.bak", _image(2), "PNG")  # wrong extension
    _write(base / "test/crack/x.bmp", _image(3), "BMP")
    _write(base / "ground_truth/crack/x_gt.bmp", _mask(255, (0, 4, 0, 4)), "BMP")
    train = read_mvtec(tmp_path, "cat", "train")
    assert [s.image_path.name for s in train] == ["a.JPG", "b.bmp"]
    assert [s.image_path.name for s in read_mvtec(tmp_path, "cat", "train", ["bmp"])] == ["b.bmp"]
    test = read_mvtec(tmp_path, "cat", "test", mask_pattern="{stem}_gt.bmp")
    assert test[0].mask_path == base / "ground_truth/crack/x_gt.bmp"
    with pytest.raises(KdadError, match=r"x_mask.png"):
        read_mvtec(tmp_path, "cat", "test")


# ------------------------------------------------------------------------------ BTAD
def _btad(root: Path) -> Path:
    # category 01: bmp images, png masks; category 03: bmp images and bmp masks
    for cat, mask_fmt in (("01", "png"), ("03", "bmp")):
        base = root / cat
        for i in range(3):
            _write(base / f"train/ok/{i:04d}.bmp", _image(i), "BMP")
        _write(base / "test/ok/0000.bmp", _image(10), "BMP")
        _write(base / "test/ko/0001.bmp", _image(11), "BMP")
        _write(base / "test/ko/0002.bmp", _image(12), "BMP")
        _write(base / f"ground_truth/ko/0001.{mask_fmt}", _mask(255, (0, 8, 0, 8)), mask_fmt.upper())
        _write(base / f"ground_truth/ko/0002.{mask_fmt}", _mask(255, (8, 24, 4, 12)), mask_fmt.upper())
    return root


def test_read_btad_bmp_images_png_and_bmp_masks(tmp_path: Path) -> None:
    root = _btad(tmp_path)
    train = read_btad(root, "01", "train")
    assert [s.image_path.name for s in train] == ["0000.bmp", "0001.bmp", "0002.bmp"]
    for cat, ext in (("01", "png"), ("03", "bmp")):
        test = read_btad(root, cat, "test")
        assert [(s.label, s.defect) for s in test] == [(0, "good"), (1, "ko"), (1, "ko")]
        assert test[1].mask_path == root / cat / f"ground_truth/ko/0001.{ext}"
        data = CachedImageDataset(test, image_size=SIZE)
        assert torch.equal(data.masks[2, 0], torch.from_numpy(_mask(1, (8, 24, 4, 12))))
        assert torch.equal(data.labels, torch.tensor([0, 1, 1]))
        # images decode to the written pixels (bmp is lossless; same size -> no resampling)
        assert torch.equal(data.images[0], torch.from_numpy(_image(10)).permute(2, 0, 1))
    explicit = read_btad(root, "01", "test", mask_pattern="{stem}.png")
    assert explicit[2].mask_path == root / "01/ground_truth/ko/0002.png"
    with pytest.raises(KdadError, match=r"0001\.bmp has no mask .*data.mask_pattern"):
        read_btad(root, "03", "test", mask_pattern="{stem}.png")


# ------------------------------------------------------------------------------ VisA
def _visa(root: Path, rows: list[dict[str, str]]) -> Path:
    path = root / "split_csv" / "1cls.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_read_visa_with_nonbinary_masks(tmp_path: Path) -> None:
    rows = []
    for i in range(3):
        rel = f"candle/Data/Images/Normal/{i:03d}.JPG"
        _write(tmp_path / rel, _image(i), "JPEG")
        rows.append({"object": "candle", "split": "train", "label": "normal", "image": rel, "mask": ""})
    _write(tmp_path / "candle/Data/Images/Normal/100.JPG", _image(5), "JPEG")
    rows.append(
        {
            "object": "candle",
            "split": "test",
            "label": "normal",
            "image": "candle/Data/Images/Normal/100.JPG",
            "mask": "",
        }
    )
    for i, value in ((0, 1), (1, 3)):
        img = f"candle/Data/Images/Anomaly/{i:03d}.JPG"
        msk = f"candle/Data/Masks/Anomaly/{i:03d}.png"
        _write(tmp_path / img, _image(20 + i), "JPEG")
        _write(tmp_path / msk, _mask(value, (4, 12, 8, 16)))  # values 1 / 3, not 255
        rows.append({"object": "candle", "split": "test", "label": "anomaly", "image": img, "mask": msk})
    _write(tmp_path / "pcb1/Data/Images/Normal/000.JPG", _image(9), "JPEG")
    rows.append(
        {"object": "pcb1", "split": "train", "label": "normal", "image": "pcb1/Data/Images/Normal/000.JPG", "mask": ""}
    )
    _visa(tmp_path, rows)

    assert len(read_visa(tmp_path, "candle", "train")) == 3
    assert len(read_visa(tmp_path, "pcb1", "train")) == 1
    test = read_visa(tmp_path, "candle", "test")
    assert [(s.label, s.defect) for s in test] == [(0, "good"), (1, "anomaly"), (1, "anomaly")]
    data = CachedImageDataset(test, image_size=SIZE)
    expected = torch.from_numpy(_mask(1, (4, 12, 8, 16)))
    assert torch.equal(data.masks[1, 0], expected)
    assert torch.equal(data.masks[2, 0], expected)
    assert data.masks[0].sum() == 0
    batch = collate([data[i] for i in range(3)])
    assert set(torch.unique(batch.mask).tolist()) == {0.0, 1.0}

    with pytest.raises(KdadError, match=r"category 'bottle' not found .*available: candle, pcb1"):
        read_visa(tmp_path, "bottle", "train")
    with pytest.raises(KdadError, match=r"other\.csv not found.*data.split_csv"):
        read_visa(tmp_path, "candle", "train", split_csv="split_csv/other.csv")


def test_read_visa_missing_mask(tmp_path: Path) -> None:
    img = "candle/Data/Images/Anomaly/000.JPG"
    _write(tmp_path / img, _image(0), "JPEG")
    _visa(
        tmp_path,
        [
            {
                "object": "candle",
                "split": "test",
                "label": "anomaly",
                "image": img,
                "mask": "candle/Data/Masks/Anomaly/000.png",
            }
        ],
    )
    with pytest.raises(KdadError, match=r"Anomaly/000\.JPG has no mask .*000\.png"):
        read_visa(tmp_path, "candle", "test")


# ------------------------------------------------------------------------------ folder
def _folder(root: Path, n_normal: int = 10, masks: bool = True) -> dict[str, Path]:
    dirs = {k: root / k for k in ("normal", "abnormal", "masks", "test_normal")}
    for i in range(n_normal):
        _write(dirs["normal"] / f"n{i:02d}.png", _image(i))
    for i in range(2):
        _write(dirs["test_normal"] / f"t{i}.png", _image(50 + i))
    for i in range(3):
        _write(dirs["abnormal"] / f"a{i}.png", _image(100 + i))
        if masks:
            _write(dirs["masks"] / f"a{i}_mask.png", _mask(255, (0, 4 + 4 * i, 0, 8)))
    return dirs


def test_read_folder_holdout_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    d = _folder(tmp_path)
    train = read_folder(d["normal"], d["abnormal"], d["masks"], split="train", seed=3)
    test = read_folder(d["normal"], d["abnormal"], d["masks"], split="test", seed=3)
    train_names = [s.image_path.name for s in train]
    held = [s.image_path.name for s in test if s.label == 0]
    assert len(train) == 8 and len(held) == 2
    assert set(train_names).isdisjoint(held)
    assert sorted(train_names + held) == [f"n{i:02d}.png" for i in range(10)]
    assert train_names == sorted(train_names)
    # same seed -> same split; the independent reference: NumPy's permutation
    perm = np.random.default_rng(3).permutation(10)[:2]
    assert sorted(held) == sorted(f"n{i:02d}.png" for i in perm)
    assert [s.image_path.name for s in read_folder(d["normal"], d["abnormal"], d["masks"], split="train", seed=3)] == (
        train_names
    )
    anomalous = [s for s in test if s.label == 1]
    assert [s.mask_path.name for s in anomalous] == ["a0_mask.png", "a1_mask.png", "a2_mask.png"]
    data = CachedImageDataset(test, image_size=SIZE)
    assert data.has_masks
    assert int(data.masks[-1].sum()) == 12 * 8


def test_read_folder_with_test_normal_dir_and_without_masks(tmp_path: Path) -> None:
    d = _folder(tmp_path, masks=False)
    train = read_folder(d["normal"], d["abnormal"], test_normal_dir=d["test_normal"], split="train")
    assert len(train) == 10  # no hold-out when test normals are given
    test = read_folder(d["normal"], d["abnormal"], test_normal_dir=d["test_normal"], split="test")
    assert [(s.image_path.name, s.label) for s in test] == [
        ("t0.png", 0),
        ("t1.png", 0),
        ("a0.png", 1),
        ("a1.png", 1),
        ("a2.png", 1),
    ]
    # no mask folder: the mask is unknown, represented by mask_path None
    assert all(s.mask_path is None and not s.mask_known for s in test if s.label == 1)
    data = CachedImageDataset(test, image_size=SIZE)
    assert not data.has_masks
    assert data.mask_known.tolist() == [True, True, False, False, False]
    batch = collate([data[i] for i in range(5)])
    assert torch.all(batch.mask[:2] == 0) and torch.all(batch.mask[2:] == -1.0)


# ------------------------------------------------------------------------------ errors
def test_error_missing_root(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for reader in (read_mvtec, read_btad, read_visa):
        with pytest.raises(KdadError, match=rf"{missing} does not exist.*data.root"):
            reader(missing, "bottle", "train")
    with pytest.raises(KdadError, match=rf"{missing} does not exist"):
        read_folder(missing, split="train")


def test_error_unknown_category_lists_available(tiny_mvtec: Path) -> None:
    with pytest.raises(KdadError) as info:
        read_mvtec(tiny_mvtec, "bottle", "train")
    message = str(info.value)
    assert "'bottle'" in message and str(tiny_mvtec) in message
    assert "available: alpha, beta" in message and "data.category" in message
    assert "\n" not in message


def test_error_empty_train_folder(tmp_path: Path) -> None:
    (tmp_path / "cat/train/good").mkdir(parents=True)
    (tmp_path / "cat/train/good/readme.txt").write_text("not an image")
    with pytest.raises(KdadError, match=r"no training images .* in .*cat/train/good.*extensions"):
        read_mvtec(tmp_path, "cat", "train")
    (tmp_path / "b/train/ok").mkdir(parents=True)
    with pytest.raises(KdadError, match=r"b/train/ok"):
        read_btad(tmp_path, "b", "train")


def test_error_anomalous_image_without_mask(tmp_path: Path) -> None:
    _write(tmp_path / "cat/test/scratch/007.png", _image(0))
    (tmp_path / "cat/ground_truth/scratch").mkdir(parents=True)
    with pytest.raises(KdadError) as info:
        read_mvtec(tmp_path, "cat", "test")
    message = str(info.value)
    assert "scratch/007.png has no mask" in message
    assert "ground_truth/scratch/007_mask.png" in message and "add the mask" in message

    d = _folder(tmp_path / "f", masks=False)
    d["masks"].mkdir()
    with pytest.raises(KdadError, match=r"a0\.png has no mask .*masks/a0_mask\.png"):
        read_folder(d["normal"], d["abnormal"], d["masks"], split="test")


def test_error_mask_size_differs(tmp_path: Path) -> None:
    image = _write(tmp_path / "img.png", _image(0))
    mask = _write(tmp_path / "img_mask.png", _mask(255, (0, 4, 0, 4), size=(SIZE, SIZE + 2)))
    with pytest.raises(KdadError) as info:
        CachedImageDataset([Sample(image, 1, mask, "x")], image_size=16)
    message = str(info.value)
    assert f"mask {mask} is {SIZE + 2}x{SIZE}" in message
    assert f"image {image} is {SIZE}x{SIZE}" in message
    assert "use a mask of the image's size" in message


def test_error_unreadable_image(tmp_path: Path) -> None:
    good = _write(tmp_path / "ok.png", _image(0))
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:150])
    for bad in (corrupt, truncated):
        samples = [Sample(good, 0, None, "good"), Sample(bad, 0, None, "good")]
        with pytest.raises(KdadError) as info:
            CachedImageDataset(samples, image_size=16, num_threads=2)
        message = str(info.value)
        assert f"cannot read image {bad}" in message and "replace or delete" in message
        assert "\n" not in message


def test_error_unknown_split(tiny_mvtec: Path) -> None:
    with pytest.raises(KdadError, match="unknown split 'val'"):
        read_mvtec(tiny_mvtec, "alpha", "val")
