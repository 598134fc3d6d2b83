"""Data: readers per dataset layout, the demo set, a cached dataset and one LightningDataModule.

* :mod:`kdad.data.readers`: ``read_mvtec`` (also MPDD and the demo set), ``read_btad``,
  ``read_visa``, ``read_ksdd2``, ``read_folder`` -> ``list[Sample]``.
* :mod:`kdad.data.demo`: the procedural demo set in MVTec AD layout.
* :mod:`kdad.data.dataset`: ``CachedImageDataset`` (decode once, keep uint8 tensors) and
  ``collate`` -> :class:`Batch`.
* :mod:`kdad.data.synthesis`: ``AnomalySynthesizer`` (Perlin + texture synthetic anomalies of
  DRAEM / URD, foreground masks) and the ``(index, epoch)``-keyed training data flow.
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
    read_ksdd2,
    read_mvtec,
    read_visa,
)
from kdad.data.synthesis import (
    DRAEM_TEXTURE_OPS,
    FOREGROUND_MODES,
    TEXTURE_AUGMENTS,
    AnomalySynthesizer,
    EpochKeySampler,
    SyntheticAnomalyDataset,
    TextureFolder,
    compute_foreground_masks,
    perlin_noise,
    procedural_texture,
    resolve_foreground,
    sample_rng,
)

__all__ = [
    "DEMO_CATEGORIES",
    "DEMO_DEFECTS",
    "DEMO_OBJECTS",
    "DEMO_TEXTURES",
    "DRAEM_TEXTURE_OPS",
    "FOREGROUND_MODES",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "MASK_UNKNOWN",
    "TEXTURE_AUGMENTS",
    "AnomalyDataModule",
    "AnomalySynthesizer",
    "Batch",
    "CachedImageDataset",
    "EpochKeySampler",
    "Sample",
    "SyntheticAnomalyDataset",
    "TextureFolder",
    "collate",
    "compute_foreground_masks",
    "default_demo_root",
    "ensure_demo_dataset",
    "generate_demo_dataset",
    "perlin_noise",
    "procedural_texture",
    "read_btad",
    "read_folder",
    "read_ksdd2",
    "read_mvtec",
    "read_visa",
    "resolve_foreground",
    "sample_rng",
]
