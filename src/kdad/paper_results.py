"""Published numbers that ``kdad-report`` puts next to kdad's own results.

Values are in **percent**, exactly as printed in the papers. Each table maps kdad metric names
to the paper's metric, so a paper's "PRO" is compared with the kdad metric that computes the same
thing (for RD that is ``rd_legacy_pro``, the RD code's per-image PRO, not ``aupro``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class PaperTable:
    """One paper's per-category results for one (method, backbone, dataset)."""

    name: str
    """Short label used in report headers, e.g. ``RD paper``."""
    citation: str
    method: str
    backbone: str
    dataset: str
    metric_names: Mapping[str, str]
    """kdad metric -> the paper's name for it (only these metrics are compared)."""
    values: Mapping[str, Mapping[str, float]]
    """category -> kdad metric -> value in percent."""
    published_means: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """row label (``mean``, ``textures mean``, ``objects mean``) -> kdad metric -> percent, as printed."""
    source: str = ""
    notes: tuple[str, ...] = ()

    def value(self, category: str, metric: str) -> float | None:
        """The paper's value in percent, or None when the paper has none."""
        return self.values.get(category, {}).get(metric)


def _freeze(
    rows: dict[str, tuple[float, float, float]], metrics: tuple[str, str, str]
) -> Mapping[str, Mapping[str, float]]:
    return MappingProxyType({row: MappingProxyType(dict(zip(metrics, values))) for row, values in rows.items()})


_RD_METRICS = ("image_auroc", "pixel_auroc", "rd_legacy_pro")

#: Deng & Li, CVPR 2022, Tables 1-2: MVTec AD, WRN50-2 teacher, 256x256 (I-AUROC, P-AUROC, PRO).
RD_MVTEC = PaperTable(
    name="RD paper",
    citation="Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022",
    method="rd",
    backbone="wide_resnet50_2",
    dataset="mvtec",
    metric_names=MappingProxyType({"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC", "rd_legacy_pro": "PRO"}),
    values=_freeze(
        {
            "carpet": (98.9, 98.9, 97.0),
            "grid": (100.0, 99.3, 97.6),
            "leather": (100.0, 99.4, 99.1),
            "tile": (99.3, 95.6, 90.6),
            "wood": (99.2, 95.3, 90.9),
            "bottle": (100.0, 98.7, 96.6),
            "cable": (95.0, 97.4, 91.0),
            "capsule": (96.3, 98.7, 95.8),
            "hazelnut": (99.9, 98.9, 95.5),
            "metal_nut": (100.0, 97.3, 92.3),
            "pill": (96.6, 98.2, 96.4),
            "screw": (97.0, 99.6, 98.2),
            "toothbrush": (99.5, 99.1, 94.5),
            "transistor": (96.7, 92.5, 78.0),
            "zipper": (98.5, 98.2, 95.4),
        },
        _RD_METRICS,
    ),
    published_means=_freeze(
        {"textures mean": (99.5, 97.7, 95.0), "objects mean": (98.0, 97.9, 93.4), "mean": (98.5, 97.8, 93.9)},
        _RD_METRICS,
    ),
    source="the paper's Tables 1-2, as transcribed in kdad's RD spec (rd_urd.md section 2.7)",
    notes=(
        (
            "RD paper PRO is the RD code's per-image PRO, "
            "compared with kdad's rd_legacy_pro (not aupro, the MVTec AU-PRO)."
        ),
        (
            "The per-category values were transcribed from the paper for kdad's RD spec; their means equal the "
            "published 98.5 / 97.8 / 93.9, but check a single category against the paper's PDF before relying on it."
        ),
    ),
)

#: Every published table kdad knows.
PAPER_TABLES: tuple[PaperTable, ...] = (RD_MVTEC,)


def paper_table(method: str, backbone: str, dataset: str) -> PaperTable | None:
    """The published table for this (method, backbone, dataset), or None."""
    for table in PAPER_TABLES:
        if (table.method, table.backbone, table.dataset) == (method, backbone, dataset):
            return table
    return None
