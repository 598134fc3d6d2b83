"""Use a trained model on new images: score, decision and an overlay per image.

The pipeline behind ``kdad-predict``, usable from Python without Hydra::

    from kdad.predict import Predictor

    predictor = Predictor.from_checkpoint("outputs/train/runs/<run>/checkpoints/last.ckpt")
    report = predictor.run("new_images/", "predictions/")      # files: CSV, JSON, overlays
    results = predictor.predict(["a.png", "b.png"])             # in memory: Prediction objects

Preprocessing is the training one (:mod:`kdad.data.dataset`): decode, convert to 8-bit RGB
(:func:`kdad.data.dataset.to_rgb`: greyscale and palette images become three channels, RGBA
drops its alpha channel, 16-bit grey keeps its top byte), resize to the model's input size
(``data.image_size`` recorded in the checkpoint) with PIL bilinear, no crop. Anomaly maps are
resized back to each image's own size (bilinear) for the pixel decision and the overlay.

Decisions: an image is anomalous when its score is *above* the image threshold; a pixel is part
of the predicted defect when its anomaly-map value is above the pixel threshold. By default both
come from the checkpoint (normal-data thresholds, :class:`kdad.callbacks.NormalThresholds`);
``threshold`` / ``pixel_threshold`` override them. Without either, the image threshold is an error.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from kdad.data.dataset import _open_image, as_size, to_rgb
from kdad.data.readers import IMAGE_EXTENSIONS, list_images
from kdad.errors import KdadError
from kdad.results import write_json_atomic

log = logging.getLogger(__name__)

#: matplotlib colour map of the overlays (the one of kdad.callbacks.visualizer's picture grid)
OVERLAY_COLORMAP = "jet"
#: colour of the predicted-defect contour (RGB)
CONTOUR_COLOR = (255, 255, 255)

ImageInput = str | Path | np.ndarray | Image.Image


# ------------------------------------------------------------------------------------ inputs
def resolve_inputs(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image files named by ``spec``: a file, a folder (its images, not recursive), a glob
    (``**`` recursive), or a list of those. Folders and globs keep files whose extension is one
    of :data:`kdad.data.readers.IMAGE_EXTENSIONS`; a file named explicitly is always kept.
    Sorted within each item, duplicates removed; a one-line :class:`KdadError` when nothing
    matches."""
    items = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not items:
        raise KdadError("no input given; pass input=<image file | folder of images | glob such as 'dir/*.png'>")
    found: list[Path] = []
    for item in items:
        text = os.path.expanduser(str(item))
        path = Path(text)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            images = list_images(path, IMAGE_EXTENSIONS)
            if not images:
                raise KdadError(
                    f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in folder {path}; pass input=<folder with images>"
                )
            found += images
        elif glob.has_magic(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            images = [m for m in matches if m.is_file() and m.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
            if not images:
                raise KdadError(f"no image files match input={item}; check the pattern (quote it on the shell)")
            found += images
        else:
            raise KdadError(
                f"input {item} does not exist; pass input=<image file | folder of images | glob such as 'dir/*.png'>"
            )
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file as uint8 RGB ``[H,W,3]`` exactly as the training data are decoded
    (:func:`kdad.data.dataset.to_rgb`); a one-line KdadError if it cannot be read."""
    return np.asarray(to_rgb(_open_image(path, "image"), path), dtype=np.uint8)


def _as_rgb(image: ImageInput) -> np.ndarray:
    if isinstance(image, (str, Path)):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(image), dtype=np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise KdadError(
            f"an image array must be uint8 [H,W], [H,W,3] or [H,W,4], got {array.dtype} {list(array.shape)}"
        )
    return np.ascontiguousarray(array[..., :3])


# ------------------------------------------------------------------------------------ device, thresholds
def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:<index>``."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise KdadError(f"device={name} but no CUDA GPU is visible; use device=cpu or device=auto")
        return torch.device(name)
    raise KdadError(f"unknown device={name}; use one of auto, cpu, cuda, cuda:<index>")


@dataclass(frozen=True)
class DecisionThresholds:
    """The thresholds a prediction run uses, and where each came from."""

    image: float
    pixel: float | None
    image_source: str
    pixel_source: str
    fpr: float | None = None  # the stored thresholds' false-positive rate on held-out normal data

    def as_dict(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "pixel": self.pixel,
            "image_source": self.image_source,
            "pixel_source": self.pixel_source,
            "fpr": self.fpr,
        }


def resolve_thresholds(
    stored: dict[str, Any] | None,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    checkpoint: str = "the model",
) -> DecisionThresholds:
    """Given thresholds override the stored normal-data thresholds (``model.normal_thresholds``).
    No image threshold at all is a one-line :class:`KdadError`; no pixel threshold only means no
    predicted-defect contour."""
    stored = dict(stored or {})
    described = f"checkpoint: {stored.get('source', 'normal data')}, fpr {stored.get('fpr')}"
    if threshold is not None:
        image, image_source = float(threshold), f"given (threshold={float(threshold):g})"
    elif stored.get("image") is not None:
        image, image_source = float(stored["image"]), described
    else:
        raise KdadError(
            f"{checkpoint} stores no normal-data threshold (trained with data.holdout_fraction=0); "
            "pass threshold=<image score above which an image is anomalous>"
        )
    if pixel_threshold is not None:
        pixel, pixel_source = float(pixel_threshold), f"given (pixel_threshold={float(pixel_threshold):g})"
    elif stored.get("pixel") is not None:
        pixel, pixel_source = float(stored["pixel"]), described
    else:
        pixel, pixel_source = None, "none (no defect contour; pass pixel_threshold=<map value>)"
    return DecisionThresholds(image, pixel, image_source, pixel_source, stored.get("fpr"))


# ------------------------------------------------------------------------------------ overlays
def render_overlay(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float],
    defect_mask: np.ndarray | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """The anomaly map in :data:`OVERLAY_COLORMAP` colours (``value_range`` -> blue..red) blended
    over the image (``alpha`` = weight of the heat map), with the outline of ``defect_mask``
    drawn in :data:`CONTOUR_COLOR`. ``rgb`` uint8 [H,W,3], ``anomaly_map`` float [H,W]; returns
    uint8 [H,W,3]."""
    import cv2
    from matplotlib import colormaps

    lo, hi = value_range
    scaled = np.clip((anomaly_map - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = colormaps[OVERLAY_COLORMAP](scaled)[..., :3] * 255.0
    blended = np.clip(np.rint((1.0 - alpha) * rgb.astype(np.float64) + alpha * heat), 0, 255).astype(np.uint8)
    if defect_mask is not None and defect_mask.any():
        contours, _ = cv2.findContours(defect_mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        thickness = max(1, round(min(rgb.shape[:2]) / 256))
        blended = np.ascontiguousarray(blended)
        cv2.drawContours(blended, contours, -1, CONTOUR_COLOR, thickness)
    return blended


def overlay_value_range(anomaly_map: np.ndarray, pixel_threshold: float | None) -> tuple[float, float]:
    """The default colour scale of an overlay, centred on the pixel threshold ``t``: from the
    image's median map value ``m`` (its normal level, blue) to ``2t - m`` (red), so the middle
    of the colour map is the threshold and the defect contour follows it. When the median is
    above ``t`` (an image anomalous almost everywhere): ``[t - d, t + d]`` with ``d`` = max - t.
    Without a pixel threshold: the map's own minimum and maximum."""
    if pixel_threshold is None:
        return float(anomaly_map.min()), float(anomaly_map.max())
    span = pixel_threshold - float(np.median(anomaly_map))
    if span <= 0:
        span = float(anomaly_map.max()) - pixel_threshold
    span = max(span, 1e-6)
    return pixel_threshold - span, pixel_threshold + span


def overlay_names(paths: Sequence[Path]) -> list[str]:
    """One unique PNG name per input: its path relative to the inputs' common folder, with
    folder separators as ``__`` (``<common>/hole/000.png`` -> ``hole__000.png``); a name taken
    already (``a.png`` and ``a.jpg``) gets ``_1``, ``_2``, ..."""
    if not paths:
        return []
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    used: set[str] = set()
    unique = []
    for path in paths:
        stem = "__".join(path.relative_to(common).with_suffix("").parts)
        name, count = f"{stem}.png", 0
        while name in used:
            count += 1
            name = f"{stem}_{count}.png"
        used.add(name)
        unique.append(name)
    return unique


# ------------------------------------------------------------------------------------ predictor
@dataclass
class Prediction:
    """One image's result. ``anomaly_map`` and ``defect_mask`` are at the image's own size."""

    path: str | None
    score: float
    anomalous: bool
    anomaly_map: np.ndarray  # float32 [H,W]
    defect_mask: np.ndarray | None  # bool [H,W]: map > pixel threshold (None without one)

    @property
    def defect_fraction(self) -> float | None:
        """Share of the image's pixels above the pixel threshold."""
        return float(self.defect_mask.mean()) if self.defect_mask is not None else None


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Predictor:
    """Scores, decisions and overlays for new images from a trained kdad model.

    Args:
        model: a kdad :class:`~kdad.methods.base.AnomalyModule` (e.g. from
            :func:`kdad.checkpoint.load_model`); its ``normal_thresholds`` are the default
            thresholds.
        image_size: the model's input size (int or ``[H, W]``), as in training.
        threshold / pixel_threshold: override the stored thresholds (:func:`resolve_thresholds`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:<index>``.
        batch_size: images per forward pass.
        name: how errors name the model (the checkpoint path).
    """

    def __init__(
        self,
        model: Any,
        image_size: int | Sequence[int],
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        name: str = "the model",
    ) -> None:
        if int(batch_size) < 1:
            raise KdadError(f"invalid batch_size={batch_size}; use a positive number of images per batch")
        self.thresholds = resolve_thresholds(
            getattr(model, "normal_thresholds", None), threshold, pixel_threshold, name
        )
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.image_size = as_size(image_size)
        self.batch_size = int(batch_size)
        self.name = name
        #: the checkpoint file the model came from (set by :meth:`from_checkpoint`)
        self.checkpoint: str | None = None

    @classmethod
    def from_checkpoint(
        cls, ckpt: str | Path, image_size: int | Sequence[int] | None = None, **kwargs: Any
    ) -> Predictor:
        """Load a kdad checkpoint (:func:`kdad.checkpoint.load_model`); the input size is the
        recorded ``data.image_size`` unless ``image_size`` is given."""
        from kdad.checkpoint import load_model, recorded_image_size

        model, meta = load_model(ckpt)
        predictor = cls(model, recorded_image_size(meta, ckpt, image_size), name=f"checkpoint {ckpt}", **kwargs)
        predictor.checkpoint = str(ckpt)
        return predictor

    # -------------------------------------------------------------- in memory
    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """uint8 RGB [H,W,3] -> uint8 [3,h,w] at the model's input size (PIL bilinear, as in
        training)."""
        height, width = self.image_size
        resized = Image.fromarray(rgb).resize((width, height), Image.BILINEAR)
        return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    @torch.no_grad()
    def predict_rgb(self, images: Sequence[np.ndarray], paths: Sequence[str | None] | None = None) -> list[Prediction]:
        """Predict decoded uint8 RGB images (any sizes) in one forward pass."""
        if not images:
            return []
        batch = torch.stack([self.preprocess(rgb) for rgb in images]).to(self.device)
        output = self.model(batch)
        names = list(paths) if paths is not None else [None] * len(images)
        results = []
        for i, rgb in enumerate(images):
            size = rgb.shape[:2]
            anomaly_map = output.anomaly_map[i : i + 1].float()
            if tuple(anomaly_map.shape[-2:]) != size:
                anomaly_map = F.interpolate(anomaly_map, size=size, mode="bilinear", align_corners=False)
            values = anomaly_map[0, 0].cpu().numpy().astype(np.float32)
            score = float(output.score[i])
            pixel = self.thresholds.pixel
            results.append(
                Prediction(
                    path=names[i],
                    score=score,
                    anomalous=score > self.thresholds.image,
                    anomaly_map=values,
                    defect_mask=values > pixel if pixel is not None else None,
                )
            )
        return results

    def predict(self, images: Sequence[ImageInput]) -> list[Prediction]:
        """Predict image files, PIL images or uint8 arrays, ``batch_size`` at a time."""
        results: list[Prediction] = []
        for chunk in _chunks(list(images), self.batch_size):
            paths = [str(item) if isinstance(item, (str, Path)) else None for item in chunk]
            results += self.predict_rgb([_as_rgb(item) for item in chunk], paths)
        return results

    # -------------------------------------------------------------- files
    def run(
        self,
        inputs: str | Path | Sequence[str | Path],
        output_dir: str | Path,
        overlays: bool = True,
        overlay_alpha: float = 0.5,
        overlay_range: Sequence[float] | None = None,
        skip_unreadable: bool = False,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Predict every image of ``inputs`` (:func:`resolve_inputs`) and write into
        ``output_dir``: ``predictions.csv``, ``predictions.json`` and, with ``overlays``,
        ``overlays/<name>.png`` at each image's own size (:func:`render_overlay`,
        :func:`overlay_names`). ``overlay_range`` fixes the colour scale ``[low, high]`` for
        every image (default: per image, centred on the pixel threshold,
        :func:`overlay_value_range`). An unreadable image stops the run with a one-line
        :class:`KdadError`, or with ``skip_unreadable`` is skipped with a warning and listed
        under ``skipped`` in the JSON. Returns the JSON's content."""
        from rich.progress import Progress

        paths = resolve_inputs(inputs)
        out = Path(output_dir).expanduser()
        overlay_dir = out / "overlays"
        if overlays:
            overlay_dir.mkdir(parents=True, exist_ok=True)
        names = dict(zip(paths, overlay_names(paths)))
        rows: list[dict[str, Any]] = []
        skipped: list[dict[str, str]] = []
        with Progress(disable=not progress) as bar:
            task = bar.add_task("predicting", total=len(paths))
            for chunk in _chunks(paths, self.batch_size):
                decoded: list[tuple[Path, np.ndarray]] = []
                for path in chunk:
                    try:
                        decoded.append((path, read_rgb(path)))
                    except KdadError as error:
                        if not skip_unreadable:
                            raise KdadError(f"{error} (or pass skip_unreadable=true to skip such files)") from None
                        log.warning("skipped: %s", error)
                        skipped.append({"path": str(path), "reason": str(error)})
                results = self.predict_rgb([rgb for _, rgb in decoded], [str(p) for p, _ in decoded])
                for (path, rgb), result in zip(decoded, results):
                    overlay_path = None
                    if overlays:
                        scale = (
                            tuple(overlay_range)
                            if overlay_range is not None
                            else overlay_value_range(result.anomaly_map, self.thresholds.pixel)
                        )
                        picture = render_overlay(rgb, result.anomaly_map, scale, result.defect_mask, overlay_alpha)  # type: ignore[arg-type]
                        overlay_path = overlay_dir / names[path]
                        Image.fromarray(picture).save(overlay_path)
                    rows.append(
                        {
                            "path": str(path),
                            "score": result.score,
                            "anomalous": result.anomalous,
                            "defect_fraction": result.defect_fraction,
                            "width": int(rgb.shape[1]),
                            "height": int(rgb.shape[0]),
                            "overlay": str(overlay_path) if overlay_path is not None else None,
                        }
                    )
                bar.advance(task, len(chunk))
        if not rows:
            raise KdadError(
                f"none of the {len(paths)} input images could be read (see the warnings); pass readable images"
            )
        report = {
            "checkpoint": self.checkpoint,
            "method": getattr(self.model, "method_name", None),
            "image_size": list(self.image_size),
            "device": str(self.device),
            "thresholds": self.thresholds.as_dict(),
            "decision": "anomalous if score > thresholds.image; defect pixels: anomaly map > thresholds.pixel",
            "num_images": len(rows),
            "num_anomalous": sum(bool(r["anomalous"]) for r in rows),
            "predictions": rows,
            "skipped": skipped,
        }
        write_json_atomic(out / "predictions.json", report)
        self._write_csv(out / "predictions.csv", rows)
        return report

    def _write_csv(self, path: Path, rows: list[dict[str, Any]]) -> None:
        """One row per image: the JSON's predictions plus the image threshold used."""
        fields = ["path", "score", "anomalous", "threshold", "defect_fraction", "width", "height", "overlay"]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "threshold": self.thresholds.image})
