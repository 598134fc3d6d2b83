"""Per-image cache of a frozen teacher's features across training epochs (issue 8).

RD-style methods feed the *same* clean training images to a frozen, eval-mode teacher in every
epoch (kdad trains without augmentation), so the teacher's output for an image never changes.
Computing it once per image and reusing it removes the teacher's forward pass from every epoch
after the first: about 17 % of an RD WRN50-2 training step's FLOPs, about 30 % for ResNet-18
(measured speed-ups are in experiments/bench/README.md).

Entries are keyed by the image's file path (``Batch.path``) and stored on the device the
features were computed on, at their own dtype, each sample cloned out of its batch. The cache
stops growing once ``max_bytes`` would be exceeded (those images are recomputed each epoch).
Features of an image come from the batch it first appeared in; a later epoch reuses them in a
different batch composition, which can differ from a fresh computation by float rounding only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

log = logging.getLogger(__name__)

GIB = 1024**3


class FeatureCache:
    """``cache(keys, x, compute) -> list[Tensor]``: per-sample features, computed once per key
    (a batch with any unseen key is computed whole).

    Args:
        max_bytes: upper bound of the stored tensors' size; further images are not cached.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}; use a non-negative size")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._store: dict[str, tuple[Tensor, ...]] = {}
        self._full_logged = False

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Forget every entry (e.g. after the teacher's BatchNorm statistics changed)."""
        self._store.clear()
        self.bytes = self.hits = self.misses = 0
        self._full_logged = False

    def __call__(self, keys: Sequence[str], x: Tensor, compute: Callable[[Tensor], list[Tensor]]) -> list[Tensor]:
        """Features of the batch ``x`` (one key per sample), computing only the unseen samples."""
        if len(keys) != x.shape[0]:
            raise ValueError(f"{len(keys)} keys for a batch of {x.shape[0]} images")
        missing = [i for i, key in enumerate(keys) if key not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            # the whole batch, not just the unseen samples: a sample's features then come from a
            # batch of the same size as without the cache (also after resuming mid-epoch, when
            # part of the images is cached), so they match a fresh computation bit for bit
            fresh = compute(x)
            self._remember(
                [keys[i] for i in missing], [level[missing] for level in fresh] if len(missing) < len(keys) else fresh
            )
            return fresh
        return [torch.stack(level) for level in zip(*(self._store[key] for key in keys))]

    def _remember(self, keys: Sequence[str], features: Sequence[Tensor]) -> None:
        for j, key in enumerate(keys):
            if key in self._store:  # the same image twice in one batch
                continue
            entry = tuple(level[j].detach().clone() for level in features)
            size = sum(t.numel() * t.element_size() for t in entry)
            if self.bytes + size > self.max_bytes:
                if not self._full_logged:
                    log.warning(
                        "teacher-feature cache full at %.2f GiB (%d images): further images are recomputed "
                        "every epoch; raise method.cache_teacher_max_gib to cache them",
                        self.bytes / GIB,
                        len(self._store),
                    )
                    self._full_logged = True
                continue
            self._store[key] = entry
            self.bytes += size
