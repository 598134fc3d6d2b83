"""Data: readers per dataset layout, the demo set, a cached dataset and one LightningDataModule.

* :mod:`kdad.data.readers`: ``read_mvtec`` (also MPDD and the demo set), ``read_btad``,
  ``read_visa``, ``read_folder`` -> ``list[Sample]``.
* :mod:`kdad.data.demo`: the procedural demo set in MVTec AD layout.
* :mod:`kdad.data.dataset`: ``CachedImageDataset`` (decode once, keep uint8 tensors) and
  ``collate`` -> :class:`Batch`.
* :mod:`kdad.data.datamodule`: ``AnomalyDataModule``.
"""

from kdad.data.batch import Batch
from kdad.data.datamodule import FORMATS, AnomalyDataModule
from kdad.data.dataset import MASK_UNKNOWN, CachedImageDataset, collate
from kdad.data.demo import (
    DEMO_CATEGORIES,
    DEMO_DEFECTS,
    DEMO_OBJECTS,
    DEMO_TEXTURES,
    default_demo_root,
    ensure_demo_dataset,
    generate_demo_dataset,
)
from kdad.data.readers import (
    IMAGE_EXTENSIONS,
    Sample,
    read_btad,
    read_folder,
    read_mvtec,
    read_visa,
)

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "MASK_UNKNOWN",
    "DEMO_CATEGORIES",
    "DEMO_DEFECTS",
    "DEMO_OBJECTS",
    "DEMO_TEXTURES",
    "AnomalyDataModule",
    "Batch",
    "CachedImageDataset",
    "Sample",
    "collate",
    "default_demo_root",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "read_btad",
    "read_folder",
    "read_mvtec",
    "read_visa",
]
