"""The Batch type that flows from the datamodule to methods and callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class Batch:
    """A batch of samples with named fields.

    image:    uint8 [B,3,H,W], RGB, *not* normalised (methods normalise on the device).
    label:    int64 [B], 1 = anomalous, 0 = normal.
    mask:     float32 [B,1,h,w] in {0,1} at the evaluation resolution, or a list of
              [1,h_i,w_i] tensors when the evaluation resolution is native and sizes differ.
    path:     image file paths (str), one per sample.
    aug_image / aug_mask: optional synthetic-anomaly view (methods that need it).
    """

    image: Tensor
    label: Tensor
    mask: Tensor | list[Tensor]
    path: list[str] = field(default_factory=list)
    aug_image: Tensor | None = None
    aug_mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(value: Any) -> Any:
            if isinstance(value, Tensor):
                return value.to(device, non_blocking=non_blocking)
            if isinstance(value, list) and value and isinstance(value[0], Tensor):
                return [v.to(device, non_blocking=non_blocking) for v in value]
            return value

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})
