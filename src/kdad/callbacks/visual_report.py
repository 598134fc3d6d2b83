"""The visual report of a test run: metric curves, the score histogram and the worst cases.

After ``trainer.test`` (kdad-train and kdad-eval) :class:`VisualReport` writes into
``<output_dir>/<dirname>/`` (docs/report.md explains every picture):

* ``roc.png``: image and pixel ROC curves, AUROC in the legend;
* ``pr.png``: image and pixel precision-recall curves, AP in the legend;
* ``pro.png``: the PRO curve up to the AU-PRO FPR limit, AU-PRO in the legend;
* ``score_histogram.png``: image scores of normal vs anomalous test images, with the
  normal-data threshold (``model.normal_thresholds["image"]``, when the model has one) and the
  test-set F1-optimal threshold (labelled optimistic);
* ``worst_cases.png``: the highest-scoring normal images (worst false positives) and the
  lowest-scoring anomalous images (worst false negatives), with anomaly map and mask.

The curves are the metrics' own (``model.test_curves``, :mod:`kdad.metrics.curves`, from the
same sorts as the reported numbers), so each plotted area is the number in results.json. The
callback keeps every image score (a float per image) but pixels only of the ``2 * worst_cases``
candidate images, so its memory does not grow with the test set.
"""

from __future__ import annotations

import heapq
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from kdad.data.batch import Batch
from kdad.errors import KdadError
from kdad.metrics.curves import Curve, MetricCurves, evaluate_with_curves

if TYPE_CHECKING:  # matplotlib is imported when a report is written, not with kdad.callbacks
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

#: legend label of the F1-optimal threshold chosen on the test set
F1_THRESHOLD_LABEL = "test-set F1-optimal (optimistic)"
LEVEL_COLOURS = {"image": "tab:blue", "pixel": "tab:orange"}

# a heap entry: (key, arrival index, row); the smallest key is dropped first
HeapEntry = tuple[float, int, dict[str, Any]]


def _short_name(path: str) -> str:
    """``.../test/<defect>/<file>`` -> ``<defect>/<file>``."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts else "?"


class VisualReport(L.Callback):
    """Write the curve plots, the score histogram and the worst-case grid after the test.

    Args:
        dirname: sub-folder of the trainer's ``default_root_dir`` (the run's output folder).
        worst_cases: how many worst false positives and worst false negatives to show (each);
            0 skips ``worst_cases.png``.
        bins: histogram bins (shared by normal and anomalous scores).
        dpi: resolution of the PNGs.
    """

    def __init__(self, dirname: str = "report", worst_cases: int = 6, bins: int = 30, dpi: int = 100) -> None:
        if int(worst_cases) < 0:
            raise KdadError(f"callbacks.visual_report.worst_cases={worst_cases}; use 0 or more")
        if int(bins) < 1:
            raise KdadError(f"callbacks.visual_report.bins={bins}; use 1 or more")
        self.dirname = dirname
        self.worst_cases = int(worst_cases)
        self.bins = int(bins)
        self.dpi = int(dpi)
        self.report_dir: Path | None = None
        self.files: list[Path] = []
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._false_positives: list[HeapEntry] = []  # normal images, key = score (keep highest)
        self._false_negatives: list[HeapEntry] = []  # anomalous images, key = -score (keep lowest)
        self._seen = 0

    # ------------------------------------------------------------------ collection
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._scores, self._labels = [], []
        self._false_positives, self._false_negatives = [], []
        self._seen = 0

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(outputs, dict) or "score" not in outputs:
            return
        scores = outputs["score"].detach().float().cpu().reshape(-1)
        labels = batch.label.detach().cpu().reshape(-1)
        self._scores.append(scores)
        self._labels.append(labels)
        if self.worst_cases == 0 or "anomaly_map" not in outputs:
            return
        for i, (score, label) in enumerate(zip(scores.tolist(), labels.tolist())):
            heap, key = (self._false_negatives, -score) if label else (self._false_positives, score)
            self._seen += 1
            if len(heap) == self.worst_cases and key <= heap[0][0]:
                continue  # not among the worst so far: no pixels copied
            entry = (key, self._seen, self._row(batch, outputs, i, score, int(label)))
            if len(heap) < self.worst_cases:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)

    @staticmethod
    def _row(batch: Batch, outputs: dict[str, Any], i: int, score: float, label: int) -> dict[str, Any]:
        """CPU copies of sample ``i`` (the row format of :func:`render_worst_cases`)."""
        mask = batch.mask[i]
        if isinstance(mask, Tensor) and mask.dim() == 3:
            mask = mask[0]
        return {
            "image": batch.image[i].detach().cpu(),
            "map": outputs["anomaly_map"][i, 0].detach().float().cpu(),
            "mask": mask.detach().float().cpu(),
            "score": score,
            "label": label,
            "kind": _short_name(batch.path[i]) if batch.path else f"image {i}",
        }

    # ------------------------------------------------------------------ writing
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._scores or not trainer.is_global_zero:
            return
        scores = torch.cat(self._scores).numpy()
        labels = torch.cat(self._labels).numpy() != 0
        curves: MetricCurves | None = getattr(pl_module, "test_curves", None)
        if curves is None:  # a module without kdad's metrics: image curves from the scores seen here
            _, curves = evaluate_with_curves(scores, labels, None, None)
        normal = getattr(pl_module, "normal_thresholds", None)
        normal = normal if isinstance(normal, dict) and normal.get("image") is not None else None
        out = Path(trainer.default_root_dir) / self.dirname
        out.mkdir(parents=True, exist_ok=True)
        self.report_dir = out
        self.files = write_report(
            out,
            scores,
            labels,
            curves,
            normal_threshold=None if normal is None else float(normal["image"]),
            normal_fpr=None if normal is None or normal.get("fpr") is None else float(normal["fpr"]),
            false_positives=[row for _, _, row in sorted(self._false_positives, reverse=True)],
            false_negatives=[row for _, _, row in sorted(self._false_negatives, reverse=True)],
            bins=self.bins,
            dpi=self.dpi,
        )
        log.info("visual report (%d pictures) written to %s", len(self.files), out)


def write_report(
    out: Path,
    scores: np.ndarray,
    labels: np.ndarray,
    curves: MetricCurves,
    normal_threshold: float | None = None,
    normal_fpr: float | None = None,
    false_positives: list[dict[str, Any]] | None = None,
    false_negatives: list[dict[str, Any]] | None = None,
    bins: int = 30,
    dpi: int = 100,
) -> list[Path]:
    """Write the report's PNGs into ``out`` (pictures whose data is missing are skipped, e.g.
    the PRO curve without masks). ``false_positives``/``false_negatives``: worst first.
    Returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    files: list[Path] = []
    for name, fig in report_figures(scores, labels, curves, normal_threshold, normal_fpr, bins).items():
        FigureCanvasAgg(fig)  # the Agg backend, without pyplot's global state
        fig.savefig(out / name, dpi=dpi, pil_kwargs={"compress_level": 1})
        files.append(out / name)
    rows = [
        {**row, "kind": f"worst false positive #{rank}: {row['kind']}"}
        for rank, row in enumerate(false_positives or [], 1)
    ] + [
        {**row, "kind": f"worst false negative #{rank}: {row['kind']}"}
        for rank, row in enumerate(false_negatives or [], 1)
    ]
    if rows:
        path = out / "worst_cases.png"
        render_worst_cases(rows, path)
        files.append(path)
    return files


#: panel width range of the worst-case grid (small test images are enlarged so labels fit)
PANEL_WIDTH = (160, 256)
GAP, HEADER = 4, 18


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """A [H,W] float32 or [H,W,3] uint8 array resized to ``size`` (h, w) with PIL."""
    if array.shape[:2] == size:
        return array
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def render_worst_cases(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows of (image, anomaly map over the image, ground-truth mask), each under its title.

    Drawn as one RGB mosaic with PIL (a matplotlib grid of this many panels takes seconds).
    The maps share one colour scale (jet, blended half over the image, as in the anomaly-map
    grid), given with a colour bar in the header: brighter red = more anomalous in every row.
    ``rows``: dicts with ``image`` ([3,H,W] uint8 or float in [0,1]), ``map`` [h,w], ``mask``
    [h',w'], ``score``, ``label``, ``kind`` (the row's title).
    """
    from matplotlib import colormaps

    lo = min(float(r["map"].min()) for r in rows)
    hi = max(float(r["map"].max()) for r in rows)
    height, width = rows[0]["map"].shape[-2:]
    panel_w = int(np.clip(width, *PANEL_WIDTH))
    size = (max(1, round(height * panel_w / width)), panel_w)
    row_h = HEADER + size[0] + GAP
    top_h = 3 * HEADER  # column titles, colour bar, its end values
    canvas = np.full((top_h + len(rows) * row_h, 3 * panel_w + 2 * GAP, 3), 255, dtype=np.uint8)
    font = _font()
    jet = colormaps["jet"]
    bar = jet(np.linspace(0.0, 1.0, panel_w))[:, :3]  # the shared colour scale, left = lo
    canvas[HEADER + 3 : 2 * HEADER - 3, panel_w + GAP : 2 * panel_w + GAP] = (bar * 255).astype(np.uint8)
    hi_text = f"{hi:.4g}"
    hi_width = int(font.getbbox(hi_text)[2])
    texts = [
        ((2, 2), "image"),
        ((panel_w + GAP + 2, 2), "anomaly map (one scale)"),
        ((2 * (panel_w + GAP) + 2, 2), "ground truth"),
        ((panel_w + GAP, 2 * HEADER), f"{lo:.4g}"),
        ((2 * panel_w + GAP - hi_width - 1, 2 * HEADER), hi_text),
    ]
    for index, row in enumerate(rows):
        image = row["image"]
        if image.dtype != torch.uint8:
            image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
        rgb = _resize(image.permute(1, 2, 0).contiguous().numpy(), size) / 255.0
        norm = (_resize(row["map"].float().numpy(), size) - lo) / max(hi - lo, 1e-12)
        overlay = 0.5 * rgb + 0.5 * jet(norm.clip(0.0, 1.0))[..., :3]
        mask = _resize(row["mask"].float().numpy(), size, nearest=True) > 0.5
        mask = np.repeat(mask[..., None], 3, axis=2)
        top = top_h + index * row_h
        texts.append(((2, top + 3), f"{row['kind']}  (label {row['label']}, score {row['score']:.5g})"))
        y0 = top + HEADER
        for column, panel in enumerate((rgb, overlay, mask.astype(np.float64))):
            x0 = column * (panel_w + GAP)
            canvas[y0 : y0 + size[0], x0 : x0 + panel_w] = (panel * 255).round().astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for xy, text in texts:
        draw.text(xy, text, fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, compress_level=1)  # fast; the PNG is a few hundred KiB


def report_figures(
    scores: np.ndarray,
    labels: np.ndarray,
    curves: MetricCurves,
    normal_threshold: float | None = None,
    normal_fpr: float | None = None,
    bins: int = 30,
) -> dict[str, Figure]:
    """The report's figures by file name: ``roc.png``, ``pr.png``, ``pro.png`` (each only when
    its curves exist) and ``score_histogram.png``. ``normal_threshold``: the image threshold
    from normal data (``normal_fpr``: its false-positive rate there), drawn when given."""
    figures: dict[str, Figure] = {}
    levels = {"image": (curves.image_roc, curves.image_pr), "pixel": (curves.pixel_roc, curves.pixel_pr)}
    if curves.image_roc or curves.pixel_roc:
        fig, ax = _figure()
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
        for level, (roc, _) in levels.items():
            if roc is not None:
                ax.plot(
                    roc.x,
                    roc.y,
                    color=LEVEL_COLOURS[level],
                    label=f"{level} AUROC = {roc.area:.4f}{_counts(roc, level)}",
                )
        _finish(ax, "ROC", "false positive rate", "true positive rate", "lower right")
        figures["roc.png"] = fig
    if curves.image_pr or curves.pixel_pr:
        fig, ax = _figure()
        for level, (_, pr) in levels.items():
            if pr is not None:
                colour = LEVEL_COLOURS[level]
                # step-wise AP: precision P_k holds on (R_{k-1}, R_k]; start at recall 0
                ax.step(
                    np.r_[0.0, pr.x],
                    np.r_[pr.y[0], pr.y],
                    where="pre",
                    color=colour,
                    label=f"{level} AP = {pr.area:.4f}{_counts(pr, level)}",
                )
                ax.axhline(
                    pr.n_pos / (pr.n_pos + pr.n_neg),
                    color=colour,
                    lw=0.8,
                    ls=":",
                    label=f"{level} chance (share of positives)",
                )
        _finish(ax, "precision-recall", "recall", "precision", "best")
        figures["pr.png"] = fig
    if curves.pro is not None:
        pro = curves.pro
        fig, ax = _figure()
        ax.plot(pro.x, pro.y, color=LEVEL_COLOURS["pixel"], label=f"AU-PRO (FPR <= {pro.x_limit:g}) = {pro.area:.4f}")
        _finish(
            ax, "per-region overlap (PRO)", "false positive rate (defect-free pixels)", "per-region overlap", "best"
        )
        ax.set_xlim(0.0, pro.x_limit)
        figures["pro.png"] = fig
    fig, ax = _figure(width=6.5)
    _score_histogram(ax, scores, labels, normal_threshold, normal_fpr, curves.image_f1_threshold, bins)
    figures["score_histogram.png"] = fig
    return figures


def _figure(width: float = 5.0) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, 4.5))
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.93)  # fixed: a layout engine costs 2x
    return fig, fig.add_subplot()


def _counts(curve: Curve, level: str) -> str:
    unit = "images" if level == "image" else "pixels"
    return f" ({curve.n_pos} defect / {curve.n_neg} normal {unit})"


def _finish(ax: Axes, title: str, xlabel: str, ylabel: str, legend: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=7)


def _score_histogram(
    ax: Axes,
    scores: np.ndarray,
    labels: np.ndarray,
    normal_threshold: float | None,
    normal_fpr: float | None,
    f1_threshold: float | None,
    bins: int,
) -> None:
    """Normal vs anomalous image scores on shared bins, thresholds as vertical lines."""
    from matplotlib.ticker import MaxNLocator

    edges = np.histogram_bin_edges(scores, bins=bins)
    tallest = 1
    for name, chosen, colour in (("normal", ~labels, "tab:blue"), ("anomalous", labels, "tab:red")):
        if chosen.any():
            counts, _, _ = ax.hist(
                scores[chosen], bins=edges, alpha=0.55, color=colour, label=f"{name} test images ({int(chosen.sum())})"
            )
            tallest = max(tallest, int(np.max(counts)))
    if normal_threshold is not None:
        where = "" if normal_fpr is None else f" (FPR {normal_fpr:g} on held-out normal images)"
        ax.axvline(
            normal_threshold,
            color="tab:green",
            lw=1.5,
            ls="--",
            label=f"normal-data threshold{where} = {normal_threshold:.4g}",
        )
    if f1_threshold is not None:
        ax.axvline(f1_threshold, color="black", lw=1.5, ls=":", label=f"{F1_THRESHOLD_LABEL} = {f1_threshold:.4g}")
    ax.set_title("image anomaly scores on the test set")
    ax.set_xlabel("image anomaly score")
    ax.set_ylabel("images")
    ax.set_ylim(0, tallest * 1.45)  # head room for the legend
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
