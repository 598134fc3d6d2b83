"""One LightningDataModule for every dataset layout kdad reads.

Train: the normal training images, shuffled, no ``drop_last``. Test and predict: the test
set in a fixed order. Validation: the test set again. It is labelled "monitoring" because
kdad never selects epochs or models on it (``specs``: honest numbers). Each split is decoded
once into a :class:`~kdad.data.dataset.CachedImageDataset` the first time ``setup`` needs it.
Calling ``setup`` again does not decode again.

Synthetic anomalies (``synthesis``, a dict of :class:`~kdad.data.synthesis.AnomalySynthesizer`
arguments): training batches then also carry ``aug_image`` / ``aug_mask``. The training
loader yields ``(index, epoch)`` keys (:class:`~kdad.data.synthesis.EpochKeySampler`) and each
sample draws from ``default_rng([seed, epoch, index])``, so the anomalies depend only on
``data.seed``, the epoch and the sample, whatever ``num_workers`` is. Foreground masks (URD) are
computed once per training image in ``setup`` and cached on disk. Without ``synthesis`` the
training loader is the plain shuffled loader, unchanged.

Held-out normal images (``holdout_fraction``, default 0): a share of the normal training images
is set aside before anything is decoded (:func:`holdout_count` of them, chosen by
``default_rng([seed, HOLDOUT_STREAM])``). They never reach the training loader (nor the
synthetic-anomaly dataset, nor the foreground masks); :meth:`AnomalyDataModule.holdout_dataloader`
yields them as plain normal images (no synthetic anomalies), in a fixed order, so that
:class:`kdad.callbacks.NormalThresholds` can set decision thresholds from normal data the model
has not seen. ``num_train`` counts the images trained on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdad.data.dataset import CachedImageDataset, as_size, collate
from kdad.data.demo import default_demo_root, ensure_demo_dataset
from kdad.data.readers import (
    Sample,
    read_btad,
    read_folder,
    read_ksdd2,
    read_mvtec,
    read_visa,
)
from kdad.data.synthesis import (
    AnomalySynthesizer,
    EpochKeySampler,
    SyntheticAnomalyDataset,
    compute_foreground_masks,
    resolve_foreground,
)
from kdad.errors import KdadError

log = logging.getLogger(__name__)

#: The values ``data.format`` accepts.
FORMATS: tuple[str, ...] = ("mvtec", "mpdd", "btad", "visa", "folder", "demo", "ksdd2")

#: Second seed word of the hold-out draw: ``default_rng([data.seed, HOLDOUT_STREAM])`` (a stream of
#: its own, independent of the ``folder`` format's test split, which uses ``data.seed`` alone).
HOLDOUT_STREAM = 0x484F4C44


def holdout_count(num_images: int, fraction: float) -> int:
    """How many of ``num_images`` normal training images ``fraction`` holds out:
    ``ceil(fraction * num_images)`` (so any fraction > 0 holds out at least one image)."""
    if fraction <= 0:
        return 0
    return math.ceil(round(fraction * num_images, 9))  # round: 0.1 * 30 is 3.0000000000000004


class AnomalyDataModule(L.LightningDataModule):
    """Datasets in MVTec AD, MPDD, BTAD, VisA, KolektorSDD2, plain-folder or demo layout.

    Args:
        format: one of :data:`FORMATS`. ``"mpdd"`` and ``"demo"`` use the MVTec layout.
        root: dataset folder. For ``"demo"``, ``None`` means ``$KDAD_CACHE/demo`` or
            ``~/.cache/kdad/demo``; the demo set is generated there on first use.
        category: category folder (VisA: the CSV ``object``). Ignored by ``"folder"`` and
            ``"ksdd2"`` (one category; its config names it ``ksdd2``).
        image_size: resize target, an int or ``[H, W]`` (PIL bilinear, no crop).
        mask_resolution: ``"input"`` (masks at ``image_size``, bilinear then ``> 0.5``) or
            ``"native"`` (masks at their files' sizes; a list in the Batch when sizes differ).
        extensions / mask_pattern: override the readers' file extensions / mask-name patterns
            (``None`` keeps each reader's default).
        split_csv: VisA split file, relative to ``root`` unless absolute.
        normal_dir, abnormal_dir, mask_dir, test_normal_dir, test_split_ratio, seed: the
            ``"folder"`` format (see :func:`kdad.data.readers.read_folder`). ``seed`` also
            drives the training order and the synthetic anomalies.
        synthesis: ``None`` (default) or the keyword arguments of
            :class:`~kdad.data.synthesis.AnomalySynthesizer` (methods that train on synthetic
            anomalies set it in their config).
        holdout_fraction: share of the normal training images held out of training for
            normal-data thresholds (:func:`holdout_count`; drawn with ``seed``). 0 (the
            default here; the paper presets) trains on every image. The ``data`` configs set
            0.1.
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
        synthesis: dict[str, Any] | None = None,
        holdout_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if format not in FORMATS:
            raise KdadError(f"unknown data.format='{format}'; use one of {', '.join(FORMATS)}")
        if mask_resolution not in ("input", "native"):
            raise KdadError(f"invalid data.mask_resolution='{mask_resolution}'; use one of input, native")
        if not isinstance(holdout_fraction, (int, float)) or not 0.0 <= float(holdout_fraction) < 1.0:
            raise KdadError(
                f"invalid data.holdout_fraction={holdout_fraction!r}; use a fraction in [0, 1), "
                "e.g. 0.1 (0 trains on every image and stores no normal-data threshold)"
            )
        if format == "folder" and normal_dir is None:
            raise KdadError("data.format=folder needs data.normal_dir; set it to a folder of normal images")
        self._format = format
        self._category = str(category)
        self._image_size = as_size(image_size)
        self._extensions = list(extensions) if extensions is not None else None
        self._samples: dict[str, list[Sample]] = {}
        self.train_dataset: CachedImageDataset | None = None
        self.test_dataset: CachedImageDataset | None = None
        #: the held-out normal training images (decoded on first use, see holdout_dataloader)
        self.holdout_dataset: CachedImageDataset | None = None
        if synthesis is not None and not isinstance(synthesis, Mapping):
            raise KdadError(f"data.synthesis must be null or a mapping of synthesis options, got {synthesis!r}")
        self._synthesis = AnomalySynthesizer(**synthesis) if synthesis is not None else None
        #: bool [N,H,W] foreground masks of the training images (None: no restriction)
        self.train_foreground: Tensor | None = None
        self._foreground_done = False

    # ------------------------------------------------------------------ description
    @property
    def dataset_name(self) -> str:
        """The dataset format (``mvtec``, ``mpdd``, ``btad``, ``visa``, ``folder``, ``demo``,
        ``ksdd2``)."""
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
    def synthesis(self) -> AnomalySynthesizer | None:
        """The synthetic-anomaly generator of the training batches, or None."""
        return self._synthesis

    @property
    def foreground_mode(self) -> str:
        """The resolved foreground restriction (``none``, ``grabcut``, ``otsu_inv``)."""
        if self._synthesis is None:
            return "none"
        return resolve_foreground(self._synthesis.foreground, self._format, self._category)

    @property
    def synthetic_train_dataset(self) -> SyntheticAnomalyDataset:
        """The training images with synthetic anomalies, keyed by ``(index, epoch)``."""
        if self._synthesis is None:
            raise KdadError("this datamodule has no data.synthesis; set it to train on synthetic anomalies")
        if self.train_dataset is None or not self._foreground_done:
            self.setup("fit")
        assert self.train_dataset is not None
        return SyntheticAnomalyDataset(
            self.train_dataset, self._synthesis, int(self.hparams.seed), self.train_foreground
        )

    @property
    def num_train(self) -> int:
        return len(self.samples("train"))

    @property
    def num_test(self) -> int:
        return len(self.samples("test"))

    @property
    def num_holdout(self) -> int:
        """Normal training images held out of training (``data.holdout_fraction``)."""
        return len(self.samples("holdout"))

    @property
    def has_masks(self) -> bool:
        """True when every test sample's pixel ground truth is known (pixel metrics valid)."""
        return all(s.mask_known for s in self.samples("test"))

    # ------------------------------------------------------------------ reading
    def samples(self, split: str) -> list[Sample]:
        """The split's samples as listed by the reader (cached; no decoding). ``"train"`` is
        the reader's training list without the held-out images, ``"holdout"`` those images."""
        if split not in self._samples:
            if split in ("train", "holdout"):
                self._samples["train"], self._samples["holdout"] = self._split_holdout(self._read("train"))
            else:
                self._samples[split] = self._read(split)
        return self._samples[split]

    def _split_holdout(self, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
        """``(training samples, held-out samples)``; both keep the reader's order."""
        fraction = float(self.hparams.holdout_fraction)
        count = holdout_count(len(samples), fraction)
        if count == 0:
            return samples, []
        if count >= len(samples):
            raise KdadError(
                f"data.holdout_fraction={fraction:g} holds out all {len(samples)} training images of "
                f"{self._format}/{self._category}; lower it or set data.holdout_fraction=0"
            )
        rng = np.random.default_rng([int(self.hparams.seed), HOLDOUT_STREAM])
        held = set(rng.permutation(len(samples))[:count].tolist())
        train = [s for i, s in enumerate(samples) if i not in held]
        holdout = [s for i, s in enumerate(samples) if i in held]
        log.info(
            "holding out %d of %d normal training images of %s/%s for normal-data thresholds "
            "(data.holdout_fraction=%g, data.seed=%d); training on %d",
            count,
            len(samples),
            self._format,
            self._category,
            fraction,
            int(self.hparams.seed),
            len(train),
        )
        return train, holdout

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
        if self._format == "ksdd2":
            return read_ksdd2(self.root, split, exts, hp.mask_pattern)
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
            len(dataset),
            split,
            self._format,
            self._category,
            time.perf_counter() - start,
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
        if stage in (None, "fit") and self._synthesis is not None and not self._foreground_done:
            self._setup_foreground()
        if self.test_dataset is None:
            self.test_dataset = self._build("test")

    def _setup_foreground(self) -> None:
        """Foreground masks of the training images, once (URD's restriction of the anomalies)."""
        assert self._synthesis is not None and self.train_dataset is not None
        mode = self.foreground_mode
        configured = self._synthesis.foreground
        origin = f" (foreground=auto for {self._format}/{self._category})" if configured == "auto" else ""
        log.info("synthetic anomalies: %r; foreground restriction: %s%s", self._synthesis, mode, origin)
        if mode != "none":
            self.train_foreground = compute_foreground_masks(self.train_dataset.images, self.train_dataset.paths, mode)
        self._foreground_done = True

    def _loader(
        self,
        dataset: CachedImageDataset | SyntheticAnomalyDataset | None,
        batch_size: int,
        shuffle: bool,
        sampler: EpochKeySampler | None = None,
    ) -> DataLoader:
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
            sampler=sampler,
            drop_last=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=bool(self.hparams.pin_memory),
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        batch_size = int(self.hparams.train_batch_size)
        if self._synthesis is None:
            return self._loader(self.train_dataset, batch_size, shuffle=True)
        # (index, epoch) keys: the order and every random draw depend on (seed, epoch, index) only
        dataset = self.synthetic_train_dataset
        return self._loader(
            dataset, batch_size, shuffle=False, sampler=EpochKeySampler(len(dataset), int(self.hparams.seed))
        )

    def val_dataloader(self) -> DataLoader:
        """The test set, for labelled monitoring only (never for model selection)."""
        return self.test_dataloader()

    def test_dataloader(self) -> DataLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, int(self.hparams.eval_batch_size), False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def holdout_dataloader(self) -> DataLoader:
        """The held-out normal training images, in a fixed order, without synthetic anomalies
        (decoded once, on first use)."""
        if self.num_holdout == 0:
            raise KdadError(
                f"no held-out normal images for {self._format}/{self._category}: set data.holdout_fraction to e.g. 0.1"
            )
        if self.holdout_dataset is None:
            self.holdout_dataset = self._build("holdout")
        return self._loader(self.holdout_dataset, int(self.hparams.eval_batch_size), False)

    def __repr__(self) -> str:
        return f"AnomalyDataModule(format={self._format!r}, category={self._category!r}, image_size={self._image_size})"
