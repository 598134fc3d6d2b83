"""One LightningDataModule for every dataset layout kdad reads.

Train: the normal training images, shuffled, no ``drop_last``. Test and predict: the test
set in a fixed order. Validation: the test set again. It is labelled "monitoring" because
kdad never selects epochs or models on it (``specs``: honest numbers). Each split is decoded
once into a :class:`~kdad.data.dataset.CachedImageDataset` the first time ``setup`` needs it.
Calling ``setup`` again does not decode again.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from kdad.data.dataset import CachedImageDataset, as_size, collate
from kdad.data.demo import default_demo_root, ensure_demo_dataset
from kdad.data.readers import Sample, read_btad, read_folder, read_mvtec, read_visa
from kdad.errors import KdadError

log = logging.getLogger(__name__)

#: The values ``data.format`` accepts.
FORMATS: tuple[str, ...] = ("mvtec", "mpdd", "btad", "visa", "folder", "demo")


class AnomalyDataModule(L.LightningDataModule):
    """Datasets in MVTec AD, MPDD, BTAD, VisA, plain-folder or demo layout.

    Args:
        format: one of :data:`FORMATS`. ``"mpdd"`` and ``"demo"`` use the MVTec layout.
        root: dataset folder. For ``"demo"``, ``None`` means ``$KDAD_CACHE/demo`` or
            ``~/.cache/kdad/demo``; the demo set is generated there on first use.
        category: category folder (VisA: the CSV ``object``). Ignored by ``"folder"``.
        image_size: resize target, an int or ``[H, W]`` (PIL bilinear, no crop).
        mask_resolution: ``"input"`` (masks at ``image_size``, bilinear then ``> 0.5``) or
            ``"native"`` (masks at their files' sizes; a list in the Batch when sizes differ).
        extensions / mask_pattern: override the readers' file extensions / mask-name patterns
            (``None`` keeps each reader's default).
        split_csv: VisA split file, relative to ``root`` unless absolute.
        normal_dir, abnormal_dir, mask_dir, test_normal_dir, test_split_ratio, seed: the
            ``"folder"`` format (see :func:`kdad.data.readers.read_folder`).
    """

    def __init__(
        self,
        format: str = "mvtec",
        root: str | None = None,
        category: str = "bottle",
        image_size: int | list[int] = 256,
        train_batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        mask_resolution: str = "input",
        extensions: list[str] | None = None,
        mask_pattern: str | None = None,
        split_csv: str = "split_csv/1cls.csv",
        normal_dir: str | None = None,
        abnormal_dir: str | None = None,
        mask_dir: str | None = None,
        test_normal_dir: str | None = None,
        test_split_ratio: float = 0.2,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise KdadError(f"unknown data.format='{format}'; use one of {', '.join(FORMATS)}")
        if mask_resolution not in ("input", "native"):
            raise KdadError(
                f"invalid data.mask_resolution='{mask_resolution}'; use one of input, native"
            )
        if format == "folder" and normal_dir is None:
            raise KdadError(
                "data.format=folder needs data.normal_dir; set it to a folder of normal images"
            )
        self._format = format
        self._category = str(category)
        self._image_size = as_size(image_size)
        self._extensions = list(extensions) if extensions is not None else None
        self._samples: dict[str, list[Sample]] = {}
        self.train_dataset: CachedImageDataset | None = None
        self.test_dataset: CachedImageDataset | None = None

    # ------------------------------------------------------------------ description
    @property
    def dataset_name(self) -> str:
        """The dataset format (``mvtec``, ``mpdd``, ``btad``, ``visa``, ``folder``, ``demo``)."""
        return self._format

    @property
    def category(self) -> str:
        return self._category

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images in every batch."""
        return self._image_size

    @property
    def root(self) -> Path:
        """The dataset folder (for ``folder``: ``normal_dir``)."""
        if self._format == "folder":
            return Path(str(self.hparams.normal_dir)).expanduser()
        if self.hparams.root is None:
            if self._format == "demo":
                return default_demo_root()
            raise KdadError(
                f"data.root is not set for data.format={self._format}; "
                f"set data.root to the folder holding the {self._format} dataset"
            )
        return Path(str(self.hparams.root)).expanduser()

    @property
    def num_train(self) -> int:
        return len(self.samples("train"))

    @property
    def num_test(self) -> int:
        return len(self.samples("test"))

    @property
    def has_masks(self) -> bool:
        """True when every test sample's pixel ground truth is known (pixel metrics valid)."""
        return all(s.mask_known for s in self.samples("test"))

    # ------------------------------------------------------------------ reading
    def samples(self, split: str) -> list[Sample]:
        """The split's samples as listed by the reader (cached; no decoding)."""
        if split not in self._samples:
            self._samples[split] = self._read(split)
        return self._samples[split]

    def _read(self, split: str) -> list[Sample]:
        hp = self.hparams
        exts = self._extensions
        if self._format in ("mvtec", "mpdd", "demo"):
            pattern = hp.mask_pattern if hp.mask_pattern is not None else "{stem}_mask.png"
            return read_mvtec(self.root, self._category, split, exts, pattern)
        if self._format == "btad":
            return read_btad(self.root, self._category, split, exts, hp.mask_pattern)
        if self._format == "visa":
            return read_visa(self.root, self._category, split, hp.split_csv)
        return read_folder(
            hp.normal_dir,
            hp.abnormal_dir,
            hp.mask_dir,
            hp.test_normal_dir,
            split=split,
            mask_pattern=hp.mask_pattern if hp.mask_pattern is not None else "{stem}_mask.png",
            extensions=exts,
            test_split_ratio=hp.test_split_ratio,
            seed=hp.seed,
        )

    def _build(self, split: str) -> CachedImageDataset:
        samples = self.samples(split)
        start = time.perf_counter()
        dataset = CachedImageDataset(
            samples,
            image_size=self._image_size,
            # training masks are all zero; keep them at the input size whatever is asked
            mask_resolution=self.hparams.mask_resolution if split == "test" else "input",
            description=f"decoding {self._format}/{self._category} {split}",
        )
        log.info(
            "decoded %d %s images of %s/%s in %.1f s",
            len(dataset), split, self._format, self._category, time.perf_counter() - start,
        )
        return dataset

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Generate the demo set on first use (rank 0 only); other formats need nothing."""
        if self._format == "demo":
            ensure_demo_dataset(self.root)

    def setup(self, stage: str | None = None) -> None:
        """Decode the splits that ``stage`` needs, once; later calls reuse them."""
        if self._format == "demo":
            ensure_demo_dataset(self.root)  # no-op once complete; covers direct setup() use
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build("train")
        if self.test_dataset is None:
            self.test_dataset = self._build("test")

    def _loader(self, dataset: CachedImageDataset | None, batch_size: int,
                shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = int(self.hparams.num_workers)
        # the training order comes from its own generator (seeded by data.seed), so nothing else
        # that draws random numbers (e.g. periodic monitoring) can change it
        generator = torch.Generator().manual_seed(int(self.hparams.seed)) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            drop_last=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=bool(self.hparams.pin_memory),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, int(self.hparams.train_batch_size), True)

    def val_dataloader(self) -> DataLoader:
        """The test set, for labelled monitoring only (never for model selection)."""
        return self.test_dataloader()

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, int(self.hparams.eval_batch_size), False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def __repr__(self) -> str:
        return (
            f"AnomalyDataModule(format={self._format!r}, category={self._category!r}, "
            f"image_size={self._image_size})"
        )

