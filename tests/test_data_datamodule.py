"""CachedImageDataset, collate and AnomalyDataModule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kdad.data import (
    DEMO_CATEGORIES,
    AnomalyDataModule,
    Batch,
    CachedImageDataset,
    Sample,
    collate,
    read_mvtec,
)
from kdad.errors import KdadError


def _square(index: int) -> tuple[int, int]:
    """Top-left (row, col) of tiny_mvtec's defect square k (see conftest)."""
    return 16 + 16 * index, 16 + 24 * index


def test_cached_images_match_an_independent_resize(tiny_mvtec: Path) -> None:
    samples = read_mvtec(tiny_mvtec, "alpha", "train")
    data = CachedImageDataset(samples, image_size=(40, 24))
    assert data.images.shape == (6, 3, 40, 24) and data.images.dtype == torch.uint8
    # reference: torch's antialiased bilinear resize of the decoded file (PIL's filter is the
    # same triangle filter; rounding differs by at most one grey level)
    raw = torch.from_numpy(np.array(Image.open(samples[0].image_path))).permute(2, 0, 1)
    ref = F.interpolate(raw[None].float(), size=(40, 24), mode="bilinear", antialias=True, align_corners=False)[0]
    assert (data.images[0].float() - ref).abs().max() <= 1.5
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == [0] * 6
    assert torch.all(data.masks == 0) and data.masks.shape == (6, 1, 40, 24)


def test_batch_fields_dtypes_and_shapes(tiny_mvtec: Path) -> None:
    data = CachedImageDataset(read_mvtec(tiny_mvtec, "alpha", "test"), image_size=32)
    batch = collate([data[i] for i in range(len(data))])
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.image.shape == (4, 3, 32, 32) and batch.image.dtype == torch.uint8
    assert batch.label.dtype == torch.int64 and batch.label.tolist() == [0, 0, 1, 1]
    assert batch.mask.shape == (4, 1, 32, 32) and batch.mask.dtype == torch.float32
    assert batch.mask.sum((1, 2, 3)).tolist() == [0.0, 0.0, 16.0, 16.0]
    assert batch.path == data.paths and batch.path[2].endswith("spot/000.png")
    assert batch.aug_image is None and batch.aug_mask is None
    # the yellow square is visible in the decoded image where the mask says
    r, c = _square(0)
    region = batch.image[2, :, r // 2 + 1, c // 2 + 1].tolist()
    assert region == [255, 255, 0]


def test_native_masks_are_listed_when_sizes_differ(tmp_path: Path) -> None:
    samples = []
    for i, (h, w) in enumerate([(20, 30), (24, 24)]):
        img = tmp_path / f"{i}.png"
        Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(img)
        mask = np.zeros((h, w), np.uint8)
        mask[2:5, 3:9] = 255
        Image.fromarray(mask).save(tmp_path / f"{i}_mask.png")
        samples.append(Sample(img, 1, tmp_path / f"{i}_mask.png", "x"))
    data = CachedImageDataset(samples, image_size=16, mask_resolution="native")
    batch = collate([data[0], data[1]])
    assert batch.image.shape == (2, 3, 16, 16)
    assert isinstance(batch.mask, list)
    assert [tuple(m.shape) for m in batch.mask] == [(1, 20, 30), (1, 24, 24)]
    assert all(m.dtype == torch.float32 and m.sum() == 18 for m in batch.mask)
    same = collate([data[1], data[1]])  # equal native sizes stack into one tensor
    assert isinstance(same.mask, torch.Tensor) and same.mask.shape == (2, 1, 24, 24)


def test_images_are_decoded_once(tiny_mvtec: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = PIL.Image.open

    def counting_open(fp, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    dm = AnomalyDataModule(
        format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=32, train_batch_size=4, eval_batch_size=3
    )
    dm.setup("fit")
    after_setup = len(opened)
    assert after_setup == 6 + 4 + 2  # train images, test images, two masks
    assert len(set(opened)) == after_setup
    for _ in range(2):
        assert sum(len(b) for b in dm.train_dataloader()) == 6
        assert sum(len(b) for b in dm.val_dataloader()) == 4
        assert sum(len(b) for b in dm.test_dataloader()) == 4
    train_set = dm.train_dataset
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_dataset is train_set  # setup is idempotent
    assert len(opened) == after_setup


def test_datamodule_loaders(tiny_mvtec: Path) -> None:
    dm = AnomalyDataModule(
        format="mvtec",
        root=str(tiny_mvtec),
        category="beta",
        image_size=[32, 48],
        train_batch_size=4,
        eval_batch_size=3,
    )
    assert dm.dataset_name == "mvtec" and dm.category == "beta"
    assert dm.image_size == (32, 48)
    assert dm.num_train == 6 and dm.num_test == 4 and dm.has_masks
    assert dm.hparams.train_batch_size == 4 and dm.hparams.image_size == [32, 48]
    dm.setup("fit")

    train = list(dm.train_dataloader())
    assert [len(b) for b in train] == [4, 2]  # no drop_last
    loader = dm.train_dataloader()
    epochs = [tuple(p for b in loader for p in b.path) for _ in range(5)]
    assert len(set(epochs)) > 1  # shuffled anew every epoch
    torch.manual_seed(123)  # the global RNG does not change the order: data.seed does
    fresh = dm.train_dataloader()
    assert [tuple(p for b in fresh for p in b.path) for _ in range(5)] == epochs
    orders = set(epochs)
    assert all(sorted(o) == sorted(dm.train_dataset.paths) for o in orders)
    for batch in train:
        assert batch.image.shape[1:] == (3, 32, 48)
        assert torch.equal(batch.image[:, 0], batch.image[:, 1])  # greyscale -> RGB

    test = list(dm.test_dataloader())
    assert [len(b) for b in test] == [3, 1]
    paths = [p for b in test for p in b.path]
    assert paths == dm.test_dataset.paths == [str(s.image_path) for s in dm.samples("test")]
    assert [p for b in dm.predict_dataloader() for p in b.path] == paths
    assert [p for b in dm.val_dataloader() for p in b.path] == paths
    labels = torch.cat([b.label for b in test])
    assert labels.tolist() == [0, 0, 1, 1]


def test_datamodule_test_stage_decodes_only_test(tiny_mvtec: Path) -> None:
    dm = AnomalyDataModule(format="mpdd", root=str(tiny_mvtec), category="alpha", image_size=16)
    dm.setup("test")
    assert dm.train_dataset is None and dm.test_dataset is not None
    assert len(dm.test_dataset) == 4


def test_datamodule_with_worker_processes(tiny_mvtec: Path) -> None:
    dm = AnomalyDataModule(
        format="mvtec", root=str(tiny_mvtec), category="alpha", image_size=16, num_workers=1, eval_batch_size=2
    )
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert [len(b) for b in batches] == [2, 2]
    assert torch.cat([b.label for b in batches]).tolist() == [0, 0, 1, 1]


def test_datamodule_native_masks(tiny_mvtec: Path) -> None:
    dm = AnomalyDataModule(
        format="mvtec",
        root=str(tiny_mvtec),
        category="alpha",
        image_size=16,
        mask_resolution="native",
        eval_batch_size=4,
    )
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch.image.shape == (4, 3, 16, 16)
    assert batch.mask.shape == (4, 1, 64, 64)
    r, c = _square(1)
    assert batch.mask[3, 0, r : r + 8, c : c + 8].sum() == 64 and batch.mask[3].sum() == 64


def test_datamodule_demo_format(demo_root: Path) -> None:
    dm = AnomalyDataModule(format="demo", root=str(demo_root), category="washer", image_size=32)
    dm.prepare_data()  # the fixture's set is complete: nothing is regenerated
    dm.setup("fit")
    assert dm.num_train == 8 and dm.num_test == 8
    assert torch.cat([b.label for b in dm.test_dataloader()]).sum() == 4


def test_datamodule_demo_default_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KDAD_CACHE", str(tmp_path / "cache"))
    dm = AnomalyDataModule(format="demo", category=DEMO_CATEGORIES[0])
    assert dm.root == tmp_path / "cache" / "demo"


def test_datamodule_folder_format(tmp_path: Path) -> None:
    for i in range(5):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(tmp_path / f"n{i}.png")
    abnormal = tmp_path / "bad"
    abnormal.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(abnormal / "b.png")
    dm = AnomalyDataModule(
        format="folder",
        normal_dir=str(tmp_path),
        abnormal_dir=str(abnormal),
        image_size=8,
        test_split_ratio=0.4,
        seed=1,
    )
    assert dm.num_train == 3 and dm.num_test == 3
    assert not dm.has_masks  # no mask_dir: pixel ground truth unknown
    dm.setup("fit")
    batch = next(iter(dm.test_dataloader()))
    assert batch.label.tolist() == [0, 0, 1]
    assert torch.all(batch.mask[2] == -1.0) and torch.all(batch.mask[:2] == 0)


def test_datamodule_errors(tmp_path: Path, tiny_mvtec: Path) -> None:
    with pytest.raises(
        KdadError,
        match=r"unknown data.format='coco'; use one of mvtec, mpdd, "
        r"btad, visa, folder, demo",
    ):
        AnomalyDataModule(format="coco")
    with pytest.raises(KdadError, match=r"data.mask_resolution='full'"):
        AnomalyDataModule(mask_resolution="full")
    with pytest.raises(KdadError, match=r"data.normal_dir"):
        AnomalyDataModule(format="folder")
    with pytest.raises(KdadError, match=r"data.image_size"):
        AnomalyDataModule(image_size=[1, 2, 3])
    with pytest.raises(KdadError, match=r"data.root is not set for data.format=mvtec"):
        AnomalyDataModule(format="mvtec").setup("fit")
    missing = tmp_path / "mvtec"
    with pytest.raises(KdadError, match=rf"{missing} does not exist"):
        AnomalyDataModule(format="mvtec", root=str(missing)).setup("fit")
    with pytest.raises(KdadError, match=r"category 'bottle' not found .*available: alpha, beta"):
        AnomalyDataModule(format="mvtec", root=str(tiny_mvtec)).setup("fit")
