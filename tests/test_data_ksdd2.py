"""KolektorSDD2 reader: unsupervised protocol, labels from masks, decoded masks, errors.

The miniature below has KolektorSDD2's layout (``<root>/{train,test}/<id>.png`` with
``<id>_GT.png`` beside each image) and its portrait, non-square shape (here 126x46, a fifth of
~630x230), with exactly known masks.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import kdad.data.dataset as dataset_module
from kdad.data import FORMATS, AnomalyDataModule, read_ksdd2
from kdad.errors import KdadError

H, W = 126, 46  # native (height, width)
SIZE = 64

#: id -> defect boxes (row0, row1, col0, col1, value) of its GT mask; no box = defect-free.
TRAIN: dict[str, list[tuple[int, int, int, int, int]]] = {
    "20000": [],
    "20001": [],
    "20002": [(10, 40, 5, 25, 255)],  # defective: excluded from training
    "20003": [],
    "20004": [],
    "20005": [(70, 71, 30, 31, 1)],  # one pixel of value 1 is a defect too: excluded
    "20006": [],
    "20007": [],
}
TEST: dict[str, list[tuple[int, int, int, int, int]]] = {
    "30000": [],
    "30001": [(60, 90, 20, 40, 255)],
    "30002": [],
    "30003": [(100, 120, 30, 44, 128), (10, 40, 5, 25, 7)],  # non-255 values count as defect
    "30004": [(50, 52, 10, 12, 255)],  # tiny defect
    "30005": [],
}


def _mask(boxes: list[tuple[int, int, int, int, int]]) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    for r0, r1, c0, c1, value in boxes:
        mask[r0:r1, c0:c1] = value
    return mask


def _write_split(folder: Path, spec: dict[str, list], seed: int, ext: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for stem, boxes in spec.items():
        image = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(folder / f"{stem}.{ext}")
        Image.fromarray(_mask(boxes)).save(folder / f"{stem}_GT.png")


@pytest.fixture
def ksdd2_root(tmp_path: Path) -> Path:
    root = tmp_path / "kolektorsdd2"
    _write_split(root / "train", TRAIN, seed=0)
    _write_split(root / "test", TEST, seed=1)
    (root / "train" / ".hidden.png").write_bytes(b"not an image")
    return root


def _reference_mask(boxes: list, size: int = SIZE) -> np.ndarray:
    """Binary mask resized as the RD protocol says, computed with torch instead of PIL:
    non-zero -> 1, antialiased bilinear resize of the float mask, then > 0.5."""
    binary = torch.from_numpy((_mask(boxes) != 0).astype(np.float32))[None, None]
    resized = F.interpolate(binary, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    # the miniature's boxes keep every resized value clear of the 0.5 threshold
    assert float((resized - 0.5).abs().min()) > 1e-3
    return (resized > 0.5).numpy().astype(np.uint8)


# ------------------------------------------------------------------------------ reader
def test_train_uses_only_defect_free_images(ksdd2_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="kdad.data.readers"):
        train = read_ksdd2(ksdd2_root, "train")
    assert [s.image_path.name for s in train] == [
        "20000.png",
        "20001.png",
        "20003.png",
        "20004.png",
        "20006.png",
        "20007.png",
    ]
    assert all(s.label == 0 and s.defect == "good" and s.mask_known for s in train)
    assert all(s.image_path.parent == ksdd2_root / "train" for s in train)
    assert any("2 of 8 training images" in r.getMessage() for r in caplog.records)


def test_test_labels_come_from_the_masks(ksdd2_root: Path) -> None:
    test = read_ksdd2(ksdd2_root, "test")
    assert [(s.image_path.name, s.label, s.defect) for s in test] == [
        ("30000.png", 0, "good"),
        ("30001.png", 1, "anomaly"),
        ("30002.png", 0, "good"),
        ("30003.png", 1, "anomaly"),
        ("30004.png", 1, "anomaly"),
        ("30005.png", 0, "good"),
    ]
    # every test image keeps its real mask file, normal ones included
    assert [s.mask_path for s in test] == [ksdd2_root / "test" / f"{stem}_GT.png" for stem in TEST]
    assert all(s.mask_known for s in test)


def test_gt_files_are_never_images(ksdd2_root: Path) -> None:
    for split in ("train", "test"):
        names = [s.image_path.name for s in read_ksdd2(ksdd2_root, split)]
        assert names and not any("_GT" in name for name in names)
    # an orphan mask (no image) is ignored, not read as an image
    Image.fromarray(_mask([])).save(ksdd2_root / "test" / "39999_GT.png")
    assert len(read_ksdd2(ksdd2_root, "test")) == len(TEST)


def test_extensions_and_mask_pattern_are_configurable(tmp_path: Path) -> None:
    root = tmp_path / "k"
    _write_split(root / "test", TEST, seed=3, ext="bmp")
    for stem in TEST:  # rename the masks to another scheme
        (root / "test" / f"{stem}_GT.png").rename(root / "test" / f"{stem}.mask.png")
    test = read_ksdd2(root, "test", extensions=["bmp", "png"], mask_pattern="{stem}.mask.png")
    assert [s.image_path.name for s in test] == [f"{stem}.bmp" for stem in TEST]
    assert [s.label for s in test] == [int(bool(TEST[stem])) for stem in TEST]


# ------------------------------------------------------------------------------ datamodule
def test_datamodule_decodes_ksdd2_masks(ksdd2_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "ksdd2" in FORMATS
    opened: list[tuple[str, str]] = []
    real_open = dataset_module._open_image

    def spy(path, what):  # type: ignore[no-untyped-def]
        opened.append((Path(path).name, what))
        return real_open(path, what)

    monkeypatch.setattr(dataset_module, "_open_image", spy)
    dm = AnomalyDataModule(format="ksdd2", root=str(ksdd2_root), category="ignored", image_size=SIZE, num_workers=0)
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.test_dataset is not None
    assert not any(what == "image" and "_GT" in name for name, what in opened)

    train, test = dm.train_dataset, dm.test_dataset
    assert [Path(p).name for p in train.paths] == [f"{stem}.png" for stem, boxes in TRAIN.items() if not boxes]
    assert train.images.shape == (6, 3, SIZE, SIZE) and torch.all(train.masks == 0)

    assert test.labels.tolist() == [1 if TEST[stem] else 0 for stem in TEST]
    assert test.masks.shape == (len(TEST), 1, SIZE, SIZE) and dm.has_masks
    for i, boxes in enumerate(TEST.values()):
        expected = _reference_mask(boxes)
        assert np.array_equal(test.masks[i, 0].numpy(), expected), list(TEST)[i]
    # the reference is not trivially empty: the defects survive the resize (even the tiny one)
    assert [int(test.masks[i].sum()) for i in range(len(TEST))] == [
        int(_reference_mask(b).sum()) for b in TEST.values()
    ]
    assert int(test.masks[1].sum()) > 100 and int(test.masks[4].sum()) > 0

    batch = next(iter(dm.test_dataloader()))
    assert batch.mask.min() >= 0  # every mask known: no MASK_UNKNOWN fill


def test_datamodule_native_masks_are_the_files(ksdd2_root: Path) -> None:
    dm = AnomalyDataModule(format="ksdd2", root=str(ksdd2_root), image_size=SIZE, mask_resolution="native")
    dm.setup("test")
    assert dm.test_dataset is not None
    for i, boxes in enumerate(TEST.values()):
        expected = (_mask(boxes) != 0).astype(np.uint8)
        assert np.array_equal(dm.test_dataset.masks[i][0].numpy(), expected)


# ------------------------------------------------------------------------------ errors
def _error(*args, **kwargs) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(KdadError) as info:
        read_ksdd2(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_root_and_split_folder(tmp_path: Path, ksdd2_root: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nowhere", "train")
    assert "data.root" in _error(None, "train")
    (ksdd2_root / "test").rename(ksdd2_root / "elsewhere")
    message = _error(ksdd2_root, "test")
    assert str(ksdd2_root / "test") in message and "train/ and test/" in message
    assert "unknown split" in _error(ksdd2_root, "val")


def test_no_images(ksdd2_root: Path) -> None:
    for path in (ksdd2_root / "train").glob("2000?.png"):
        path.unlink()  # only the _GT masks remain
    message = _error(ksdd2_root, "train")
    assert "no KolektorSDD2 train images" in message and str(ksdd2_root / "train") in message


def test_image_without_mask(ksdd2_root: Path) -> None:
    (ksdd2_root / "test" / "30002_GT.png").unlink()
    message = _error(ksdd2_root, "test")
    assert str(ksdd2_root / "test" / "30002.png") in message and "30002_GT.png" in message
    assert "restore the mask" in message


def test_unreadable_mask(ksdd2_root: Path) -> None:
    (ksdd2_root / "train" / "20003_GT.png").write_bytes(b"\x89PNG broken")
    message = _error(ksdd2_root, "train")
    assert "cannot read mask" in message and "20003_GT.png" in message


def test_every_training_image_defective(tmp_path: Path) -> None:
    _write_split(tmp_path / "k" / "train", {"1": [(0, 5, 0, 5, 255)]}, seed=0)
    assert "no defect-free image" in _error(tmp_path / "k", "train")


def test_bad_mask_patterns(ksdd2_root: Path) -> None:
    assert "names the image" in _error(ksdd2_root, "test", mask_pattern="{stem}.png")
    assert "invalid mask pattern" in _error(ksdd2_root, "test", mask_pattern="{id}_GT.png")
