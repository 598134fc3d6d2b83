"""Dataset readers: turn a dataset folder into a sorted list of :class:`Sample`.

Readers only *list* files; they never decode images (that happens once, in
:class:`kdad.data.dataset.CachedImageDataset`). Every user-caused problem (missing root,
unknown category, empty training folder, anomalous image without its mask, missing split
file) raises :class:`kdad.errors.KdadError` with a one-line message that names the path and
says what to do.

Layouts (see ``specs/datasets.md``):

* MVTec AD / MPDD / the built-in demo set (:func:`read_mvtec`)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png            (defect "good" = normal)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

* BTAD (:func:`read_btad`)::

    <root>/<category>/train/ok/*   <root>/<category>/test/{ok,ko}/*
    <root>/<category>/ground_truth/ko/<stem>.<png|bmp|...>

* VisA (:func:`read_visa`): ``<root>/split_csv/1cls.csv`` with columns
  ``object,split,label,image,mask``; paths relative to ``<root>``.

* KolektorSDD2 (:func:`read_ksdd2`), one category; every image has a mask beside it::

    <root>/{train,test}/<id>.png   <root>/{train,test}/<id>_GT.png

* A user's own product (:func:`read_folder`): a folder of normal images, optionally a folder
  of anomalous images and a folder of masks.

"No mask available" is represented by ``Sample.mask_path is None`` on an anomalous sample
(``label == 1``). Only :func:`read_folder` without ``mask_dir`` produces such samples; every
other layout requires a mask for each anomalous test image.
"""

from __future__ import annotations

import csv
import logging
import re
import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kdad.errors import KdadError

log = logging.getLogger(__name__)

#: Image file extensions accepted by default (matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "bmp", "tif", "tiff")

#: The defect name used for normal samples.
GOOD = "good"

_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    image_path: the image file.
    label:      0 = normal, 1 = anomalous.
    mask_path:  the ground-truth mask file; ``None`` for normal images (all-zero mask) and for
                anomalous images whose mask is unknown (pixel metrics cannot be computed).
    defect:     the defect type (``"good"`` for normal images).
    """

    image_path: Path
    label: int
    mask_path: Path | None
    defect: str

    @property
    def mask_known(self) -> bool:
        """True when the pixel ground truth is known (normal, or anomalous with a mask)."""
        return self.label == 0 or self.mask_path is not None


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    """Lower-case extensions without leading dots; ``None`` gives :data:`IMAGE_EXTENSIONS`."""
    if extensions is None:
        return IMAGE_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    result = tuple(str(e).lower().lstrip(".") for e in extensions)
    if not result or any(not e for e in result):
        raise KdadError(
            f"invalid image extensions {list(extensions)!r}; set data.extensions to a list such as [png, jpg]"
        )
    return result


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files directly inside ``folder`` (not recursive), sorted by name.

    Hidden files (``.*``) are skipped; extensions match case-insensitively. A broken link
    with an image extension raises (skipping it would silently drop a sample).
    """
    exts = set(extensions)
    images = []
    for p in _entries(folder):
        if p.name.startswith(".") or p.suffix.lower().lstrip(".") not in exts:
            continue
        if p.is_file():
            images.append(p)
        elif p.is_symlink() and not p.exists():
            raise KdadError(f"image {p} is a broken link; restore its target or delete the link")
    return sorted(images)


def _entries(folder: Path) -> list[Path]:
    """The entries of ``folder``; an unreadable folder raises a one-line KdadError."""
    try:
        return list(folder.iterdir())
    except OSError as err:
        raise KdadError(
            f"cannot list folder {folder} ({err.strerror or type(err).__name__}); "
            "check that it exists and that you may read it"
        ) from err


def _subdirs(folder: Path) -> list[str]:
    return sorted(p.name for p in _entries(folder) if p.is_dir() and not p.name.startswith("."))


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise KdadError(f"unknown split '{split}'; use one of {', '.join(_SPLITS)}")


def _check_root(root: str | Path | None, dataset: str) -> Path:
    if root is None:
        raise KdadError(f"no dataset root given for {dataset}; set data.root=<path to {dataset}>")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise KdadError(
            f"dataset root {path} does not exist; download {dataset} there or set data.root to the folder that holds it"
        )
    return path


def _check_category(root: Path, category: str, dataset: str) -> Path:
    folder = root / str(category)
    if not folder.is_dir():
        available = ", ".join(_subdirs(root)) or "none"
        raise KdadError(
            f"category '{category}' not found in {root} (available: {available}); "
            f"set data.category to one of them or check that data.root points at {dataset}"
        )
    return folder


def _require_images(folder: Path, extensions: Sequence[str], what: str) -> list[Path]:
    if not folder.is_dir():
        raise KdadError(f"{what} folder {folder} does not exist; check the dataset layout and data.root")
    images = list_images(folder, extensions)
    if not images:
        raise KdadError(
            f"no {what} images with extensions {'/'.join(extensions)} in {folder}; "
            "put images there or set data.extensions"
        )
    return images


def format_mask_name(pattern: str, image: Path) -> str:
    """Expand a mask-name pattern for ``image``: ``{stem}``, ``{name}`` and ``{suffix}``."""
    try:
        return pattern.format(stem=image.stem, name=image.name, suffix=image.suffix)
    except (KeyError, IndexError, ValueError) as err:
        raise KdadError(
            f"invalid mask pattern '{pattern}' ({err}); use placeholders {{stem}}, {{name}}, "
            "{suffix}, e.g. '{stem}_mask.png'"
        ) from err


def _find_mask(image: Path, mask_folder: Path, pattern: str | None, extensions: Sequence[str]) -> Path:
    """The mask of an anomalous image; a pattern, or ``<stem>.<any allowed extension>``."""
    if pattern is not None:
        candidates = [mask_folder / format_mask_name(pattern, image)]
    else:
        candidates = [mask_folder / f"{image.stem}.{ext}" for ext in extensions]
        candidates += [mask_folder / f"{image.stem}.{ext.upper()}" for ext in extensions]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if pattern is not None:
        expected = candidates[0].name
    else:
        expected = f"{image.stem}.<{'|'.join(extensions)}>"
    raise KdadError(
        f"anomalous image {image} has no mask (expected {mask_folder / expected}); "
        "add the mask, or set data.mask_pattern to the masks' naming scheme"
    )


# --------------------------------------------------------------------------------------------
# MVTec AD, MPDD, demo
# --------------------------------------------------------------------------------------------
def read_mvtec(
    root: str | Path,
    category: str,
    split: str,
    extensions: Iterable[str] | None = None,
    mask_pattern: str = "{stem}_mask.png",
) -> list[Sample]:
    """Read an MVTec-AD-layout category (MVTec AD, MPDD, the demo set).

    Train: every image in ``<root>/<category>/train/good`` (label 0).
    Test: every image in ``<root>/<category>/test/<defect>``; ``good`` is normal, any other
    folder is anomalous with its mask at
    ``<root>/<category>/ground_truth/<defect>/<mask_pattern>``.
    Samples are sorted by (defect folder, file name); ``good`` sorts like any other name.
    """
    _check_split(split)
    exts = normalise_extensions(extensions)
    base = _check_category(_check_root(root, "the MVTec-layout dataset"), category, "MVTec AD")
    if split == "train":
        images = _require_images(base / "train" / GOOD, exts, "training")
        return [Sample(p, 0, None, GOOD) for p in images]

    test_dir = base / "test"
    if not test_dir.is_dir():
        raise KdadError(f"test folder {test_dir} does not exist; check the dataset layout and data.root")
    samples: list[Sample] = []
    for defect in _subdirs(test_dir):
        for image in list_images(test_dir / defect, exts):
            if defect == GOOD:
                samples.append(Sample(image, 0, None, GOOD))
            else:
                mask = _find_mask(image, base / "ground_truth" / defect, mask_pattern, exts)
                samples.append(Sample(image, 1, mask, defect))
    if not samples:
        raise KdadError(
            f"no test images with extensions {'/'.join(exts)} under {test_dir}; "
            "put images in test/<defect>/ or set data.extensions"
        )
    return samples


# --------------------------------------------------------------------------------------------
# BTAD
# --------------------------------------------------------------------------------------------
def read_btad(
    root: str | Path,
    category: str,
    split: str,
    extensions: Iterable[str] | None = None,
    mask_pattern: str | None = None,
) -> list[Sample]:
    """Read a BTAD (BeanTech) category.

    Train: ``<root>/<category>/train/ok``. Test: ``test/ok`` (normal, sorted first) and
    ``test/ko`` (anomalous, defect ``"ko"``) with masks in ``ground_truth/ko``.
    Mask names: ``mask_pattern`` (e.g. ``"{stem}.png"``); by default the image's stem with
    any allowed extension (BTAD mixes bmp and png between categories).
    """
    _check_split(split)
    exts = normalise_extensions(extensions)
    base = _check_category(_check_root(root, "BTAD"), category, "BTAD")
    if split == "train":
        images = _require_images(base / "train" / "ok", exts, "training")
        return [Sample(p, 0, None, GOOD) for p in images]

    samples: list[Sample] = []
    ok_dir, ko_dir = base / "test" / "ok", base / "test" / "ko"
    if ok_dir.is_dir():
        samples += [Sample(p, 0, None, GOOD) for p in list_images(ok_dir, exts)]
    if ko_dir.is_dir():
        for image in list_images(ko_dir, exts):
            mask = _find_mask(image, base / "ground_truth" / "ko", mask_pattern, exts)
            samples.append(Sample(image, 1, mask, "ko"))
    if not samples:
        raise KdadError(
            f"no test images with extensions {'/'.join(exts)} in {ok_dir} or {ko_dir}; "
            "check the BTAD layout or set data.extensions"
        )
    return samples


# --------------------------------------------------------------------------------------------
# VisA
# --------------------------------------------------------------------------------------------
_VISA_COLUMNS = ("object", "split", "label", "image", "mask")


def read_visa(
    root: str | Path,
    category: str,
    split: str,
    split_csv: str | Path = "split_csv/1cls.csv",
) -> list[Sample]:
    """Read a VisA category from its split CSV (columns object, split, label, image, mask).

    ``split_csv`` is relative to ``root`` unless absolute. Labels are ``normal``/``anomaly``;
    image and mask paths are relative to ``root``. VisA masks hold non-zero values on defects
    (not necessarily 255); the dataset binarises them with ``!= 0``. Anomalous samples get the
    defect name ``"anomaly"``; samples keep the CSV's row order sorted by image path.
    """
    _check_split(split)
    base = _check_root(root, "VisA")
    csv_path = Path(split_csv)
    if not csv_path.is_absolute():
        csv_path = base / csv_path
    if not csv_path.is_file():
        raise KdadError(
            f"VisA split file {csv_path} not found; put VisA's split_csv/1cls.csv there or set data.split_csv"
        )
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            missing = [c for c in _VISA_COLUMNS if c not in fields]
            if missing:
                raise KdadError(
                    f"VisA split file {csv_path} lacks columns {', '.join(missing)}; "
                    f"it needs {', '.join(_VISA_COLUMNS)}"
                )
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (UnicodeDecodeError, csv.Error) as err:
        raise KdadError(
            f"cannot parse VisA split file {csv_path} ({type(err).__name__}: {err}); "
            "it must be a UTF-8 CSV with columns " + ", ".join(_VISA_COLUMNS)
        ) from err

    categories = sorted({r["object"] for r in rows})
    if category not in categories:
        raise KdadError(
            f"category '{category}' not found in {csv_path} (available: "
            f"{', '.join(categories) or 'none'}); set data.category to one of them"
        )
    samples: list[Sample] = []
    for row in rows:
        if row["object"] != category or row["split"] != split:
            continue
        image = base / row["image"]
        label_name = row["label"].lower()
        if label_name not in ("normal", "anomaly"):
            raise KdadError(
                f"unknown label '{row['label']}' for {image} in {csv_path}; labels must be 'normal' or 'anomaly'"
            )
        if not image.is_file():
            raise KdadError(f"image {image} listed in {csv_path} does not exist; re-extract VisA or fix data.root")
        if label_name == "normal":
            samples.append(Sample(image, 0, None, GOOD))
            continue
        mask = base / row["mask"] if row["mask"] else None
        if mask is None or not mask.is_file():
            raise KdadError(
                f"anomalous image {image} has no mask (expected "
                f"{mask if mask is not None else 'a mask column entry'} from {csv_path}); "
                "add the mask or fix the split file"
            )
        samples.append(Sample(image, 1, mask, "anomaly"))
    if split == "train" and not samples:
        raise KdadError(f"no training images for category '{category}' in {csv_path}; check the split file")
    samples.sort(key=lambda s: (s.label, str(s.image_path)))
    return samples


# --------------------------------------------------------------------------------------------
# KolektorSDD2
# --------------------------------------------------------------------------------------------
#: KolektorSDD2's mask names: ``<id>.png`` has ``<id>_GT.png`` beside it.
KSDD2_MASK_PATTERN = "{stem}_GT.png"


def mask_name_matcher(pattern: str) -> Callable[[str], bool]:
    """A test "is this file name a mask name under ``pattern``?".

    ``{stem}`` and ``{name}`` match any non-empty text, ``{suffix}`` a dot and an extension;
    the rest of the pattern matches literally (case-sensitive, like the mask look-up).
    """
    parts: list[str] = []
    try:
        for literal, field, _spec, _conversion in string.Formatter().parse(pattern):
            parts.append(re.escape(literal))
            if field is None:
                continue
            if field not in ("stem", "name", "suffix"):
                raise KeyError(field)
            parts.append(r"\.[^.]*" if field == "suffix" else ".+")
    except (KeyError, ValueError) as err:
        raise KdadError(
            f"invalid mask pattern '{pattern}' ({err}); use placeholders {{stem}}, {{name}}, "
            "{suffix}, e.g. '{stem}_GT.png'"
        ) from err
    regex = re.compile("".join(parts))
    return lambda name: regex.fullmatch(name) is not None


def _mask_has_defect(mask: Path) -> bool:
    """True when the mask file holds a non-zero pixel (decoded as the dataset decodes it)."""
    # imported here: kdad.data.dataset imports this module
    from kdad.data.dataset import _mask_array, _open_image

    return bool(_mask_array(_open_image(mask, "mask"), mask).any())


def read_ksdd2(
    root: str | Path,
    split: str,
    extensions: Iterable[str] | None = None,
    mask_pattern: str | None = None,
) -> list[Sample]:
    """Read KolektorSDD2 under the unsupervised protocol.

    Every image ``<root>/<split>/<id>.png`` has its ground-truth mask beside it
    (``mask_pattern``, default ``"{stem}_GT.png"``); a defective image is one whose mask holds
    a non-zero pixel. Files whose names match ``mask_pattern`` are masks and never images.
    Train: the defect-free training images only (label 0, no mask file needed downstream);
    the defective ones are excluded and their number is logged. Test: every test image,
    label 1 when its mask has a defect pixel (defect ``"anomaly"``), else 0 (``"good"``); both
    keep their mask file, so normal test images carry their real, all-zero mask. Each mask is
    decoded once here, to decide the label. Samples are sorted by file name.
    """
    _check_split(split)
    exts = normalise_extensions(extensions)
    pattern = KSDD2_MASK_PATTERN if mask_pattern is None else str(mask_pattern)
    base = _check_root(root, "KolektorSDD2")
    folder = base / split
    if not folder.is_dir():
        raise KdadError(
            f"KolektorSDD2 {split} folder {folder} does not exist; set data.root to the "
            "folder that holds KolektorSDD2's train/ and test/ folders"
        )

    files = list_images(folder, exts)
    for path in files:
        if format_mask_name(pattern, path) == path.name:
            raise KdadError(
                f"mask pattern '{pattern}' names the image {path.name} itself; KolektorSDD2 "
                "masks lie beside their images: set data.mask_pattern to e.g. '{stem}_GT.png'"
            )
    is_mask = mask_name_matcher(pattern)
    images = [p for p in files if not is_mask(p.name)]
    if not images:
        raise KdadError(
            f"no KolektorSDD2 {split} images with extensions {'/'.join(exts)} in {folder} "
            f"(mask files '{pattern}' do not count); check data.root or set data.extensions"
        )
    expected = {format_mask_name(pattern, p) for p in images}
    orphans = [p.name for p in files if is_mask(p.name) and p.name not in expected]
    if orphans:
        log.warning(
            "KolektorSDD2 %s: %d mask file(s) without an image, ignored (first: %s)",
            split,
            len(orphans),
            orphans[0],
        )

    samples: list[Sample] = []
    for image in images:
        mask = folder / format_mask_name(pattern, image)
        if not mask.is_file():
            raise KdadError(
                f"KolektorSDD2 image {image} has no ground-truth mask {mask.name} beside it; "
                "restore the mask from the dataset archive (or delete the image), or set "
                "data.mask_pattern to the masks' naming scheme"
            )
        if _mask_has_defect(mask):
            samples.append(Sample(image, 1, mask, "anomaly"))
        else:
            samples.append(Sample(image, 0, mask, GOOD))

    if split == "test":
        return samples
    train = [Sample(s.image_path, 0, None, GOOD) for s in samples if s.label == 0]
    log.info(
        "KolektorSDD2 train: %d of %d training images have defect pixels in their masks and are "
        "excluded (unsupervised protocol); training on %d defect-free images",
        len(samples) - len(train),
        len(samples),
        len(train),
    )
    if not train:
        raise KdadError(
            f"every one of the {len(samples)} KolektorSDD2 training images in {folder} has "
            "defect pixels in its mask; no defect-free image is left to train on (check data.root)"
        )
    return train


# --------------------------------------------------------------------------------------------
# a user's own folders
# --------------------------------------------------------------------------------------------
def read_folder(
    normal_dir: str | Path,
    abnormal_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    test_normal_dir: str | Path | None = None,
    *,
    split: str,
    mask_pattern: str = "{stem}_mask.png",
    extensions: Iterable[str] | None = None,
    test_split_ratio: float = 0.2,
    seed: int = 0,
) -> list[Sample]:
    """Read a user's own product from plain folders.

    Train: the images of ``normal_dir``. Without ``test_normal_dir``, a fraction
    ``test_split_ratio`` of them (chosen by a NumPy RNG seeded with ``seed``, at least one
    image when the ratio is positive) is held out for the test set instead.
    Test: held-out (or ``test_normal_dir``) normal images, then the images of
    ``abnormal_dir`` (label 1, defect ``"anomaly"``). With ``mask_dir`` each anomalous image
    must have ``<mask_dir>/<mask_pattern>``; without it the mask is unknown
    (``mask_path=None``) and pixel metrics cannot be computed.
    """
    _check_split(split)
    exts = normalise_extensions(extensions)
    normal = _require_images(Path(normal_dir).expanduser(), exts, "normal")

    if test_normal_dir is None:
        if not 0.0 <= test_split_ratio < 1.0:
            raise KdadError(
                f"data.test_split_ratio={test_split_ratio} is outside [0, 1); "
                "choose the fraction of normal images to hold out for testing"
            )
        n_test = int(round(test_split_ratio * len(normal)))  # noqa: RUF046 - a NumPy float ratio rounds to a NumPy float on NumPy 1.x
        if test_split_ratio > 0:
            n_test = max(1, n_test)
        if n_test >= len(normal):
            raise KdadError(
                f"only {len(normal)} normal images in {normal_dir}: too few to hold out "
                f"{test_split_ratio:.0%} for testing; add images or set data.test_normal_dir"
            )
        order = np.random.default_rng(seed).permutation(len(normal))
        held = set(order[:n_test].tolist())
        train = [p for i, p in enumerate(normal) if i not in held]
        test_normal = [p for i, p in enumerate(normal) if i in held]
    else:
        train = normal
        test_normal = _require_images(Path(test_normal_dir).expanduser(), exts, "test normal")

    if split == "train":
        return [Sample(p, 0, None, GOOD) for p in train]

    samples = [Sample(p, 0, None, GOOD) for p in test_normal]
    if abnormal_dir is not None:
        abnormal = _require_images(Path(abnormal_dir).expanduser(), exts, "anomalous")
        masks = Path(mask_dir).expanduser() if mask_dir is not None else None
        if masks is not None and not masks.is_dir():
            raise KdadError(
                f"mask folder {masks} does not exist; create it or set data.mask_dir=null "
                "(pixel metrics are then skipped)"
            )
        for image in abnormal:
            mask = _find_mask(image, masks, mask_pattern, exts) if masks is not None else None
            samples.append(Sample(image, 1, mask, "anomaly"))
    elif mask_dir is not None:
        raise KdadError(
            f"data.mask_dir={mask_dir} is set but data.abnormal_dir is not; "
            "set data.abnormal_dir to the folder of anomalous images"
        )
    return samples
