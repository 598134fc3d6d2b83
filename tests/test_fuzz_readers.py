"""Bad inputs fail cleanly: property-based (hypothesis) tests of the dataset readers, the image
and mask decoding, and ``read_checkpoint``.

Every case either works correctly (uint8 RGB of the expected size and content, the right label,
a binary mask aligned with its image) or raises kdad's one-line :class:`KdadError` naming the
file; never an exception from deep inside PIL/NumPy/torch, never a silently wrong label.

Hypothesis runs derandomised (the same examples on every run, reproducible in CI); the number
of examples of each property is in :data:`EXAMPLES` (docs/reliability.md quotes it).
"""

from __future__ import annotations

import csv
import io
import logging
import struct
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from kdad.checkpoint import read_checkpoint
from kdad.data import (
    MASK_UNKNOWN,
    AnomalyDataModule,
    CachedImageDataset,
    Sample,
    collate,
    read_btad,
    read_folder,
    read_ksdd2,
    read_mvtec,
    read_visa,
)
from kdad.errors import KdadError

#: Examples per property (the README / docs/reliability.md state these counts).
EXAMPLES = {
    "random_bytes_image": 60,
    "random_bytes_mask": 30,
    "truncated_file": 60,
    "corrupted_bytes": 40,
    "pixel_formats": 60,
    "mask_values": 60,
    "mask_size_mismatch": 30,
    "unicode_layouts": 25,
    "visa_csv_bytes": 40,
    "checkpoint_bytes": 30,
    "checkpoint_truncated": 40,
    "checkpoint_bit_flips": 40,
}


def fuzz(name: str, **extra: Any) -> Callable[[Any], Any]:
    """Hypothesis settings of one property: derandomised, no deadline (the machine is shared)."""
    return settings(
        max_examples=EXAMPLES[name],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **extra,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh(workdir: Path, name: str = "case") -> Path:
    """A new empty folder per hypothesis example (function fixtures do not reset between them)."""
    return Path(tempfile.mkdtemp(prefix=f"{name} ü ", dir=workdir))  # a space and a non-ASCII letter


def decode(
    image: Path, mask: Path | None = None, label: int = 0, size: Any = None, mask_resolution: str = "native"
) -> CachedImageDataset:
    """One sample decoded by the same code the datamodule uses (``size=None``: the file's)."""
    if size is None:
        with Image.open(image) as img:
            size = [img.height, img.width]
    sample = Sample(image, label, mask, "good" if label == 0 else "defect")
    return CachedImageDataset([sample], image_size=size, mask_resolution=mask_resolution, num_threads=1)


def assert_clean_error(error: KdadError, *paths: Path) -> None:
    """kdad's data error: one line, names the file(s), says what to do (after a ';')."""
    message = str(error)
    assert "\n" not in message
    for path in paths:
        assert str(path) in message, (message, path)
    assert ";" in message, message


def assert_rgb(data: CachedImageDataset, height: int, width: int) -> None:
    assert data.images.dtype == torch.uint8 and tuple(data.images.shape) == (1, 3, height, width)


def bands(array: np.ndarray, mode: str) -> Image.Image:
    """A PIL image of ``mode`` holding exactly ``array``'s bytes (no conversion)."""
    return Image.frombytes(mode, (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def encode(img: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): grey [H,W] (colour type
    0), grey+alpha [H,W,2] (4), RGB [H,W,3] (2) or RGBA [H,W,4] (6)."""
    array = array if array.ndim == 3 else array[..., None]
    height, width, bands = array.shape
    rows = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, {1: 0, 2: 4, 3: 2, 4: 6}[bands], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))
seeds = st.integers(0, 2**32 - 1)
MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM", b"II*\x00", b"MM\x00*", b"GIF89a"]
EXTENSIONS = ["png", "jpg", "jpeg", "bmp", "tif", "tiff", "PNG"]


# =============================================================================================
# images and masks: random bytes, truncation, corruption
# =============================================================================================
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about corrupt metadata
@fuzz("random_bytes_image")
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=600), ext=st.sampled_from(EXTENSIONS))
def test_random_bytes_as_image(workdir: Path, magic: bytes, body: bytes, ext: str) -> None:
    path = write(fresh(workdir) / f"x.{ext}", magic + body)
    try:
        data = decode(path, size=[8, 8])
    except KdadError as error:
        assert_clean_error(error, path)
        return
    assert_rgb(data, 8, 8)  # (almost never) bytes that happen to be an image


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz("random_bytes_mask")
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=600))
def test_random_bytes_as_mask(workdir: Path, magic: bytes, body: bytes) -> None:
    folder = fresh(workdir)
    image = write(folder / "x.png", encode(Image.new("RGB", (6, 5), (9, 8, 7)), "PNG"))
    mask = write(folder / "x_mask.png", magic + body)
    try:
        data = decode(image, mask, label=1)
    except KdadError as error:
        assert_clean_error(error, mask)
        return
    assert data.masks[0].shape == (1, 5, 6)


def _real_file(fmt: str, seed: int, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(seed)
    height, width = size
    if fmt == "GIF-like-P-PNG":
        return encode(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8)).convert("P"), "PNG")
    if fmt == "PNG16":
        return png16(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return encode(Image.fromarray(array), fmt)


FORMATS = ["PNG", "JPEG", "BMP", "TIFF", "PNG16", "GIF-like-P-PNG"]


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz("truncated_file")
@given(
    fmt=st.sampled_from(FORMATS),
    seed=seeds,
    size=sizes,
    fraction=st.floats(0.0, 1.0, allow_subnormal=False),
    as_mask=st.booleans(),
)
def test_truncated_files_fail_or_decode_exactly(
    workdir: Path, fmt: str, seed: int, size: tuple[int, int], fraction: float, as_mask: bool
) -> None:
    """A truncated image/mask raises, or (when only trailing bytes are cut) decodes exactly like
    the complete file: never a partly decoded picture."""
    folder = fresh(workdir)
    full = _real_file(fmt, seed, size)
    cut = full[: int(fraction * len(full))]
    image_bytes, mask_bytes = (encode(Image.new("L", size[::-1], 3), "PNG"), cut) if as_mask else (cut, None)
    reference = folder / "reference.png"
    write(reference, full)
    image = write(folder / "x.png", image_bytes)
    mask = write(folder / "x_mask.png", mask_bytes) if mask_bytes is not None else None
    try:
        data = decode(image, mask, label=int(as_mask), size=list(size))
    except KdadError as error:
        assert_clean_error(error, mask if as_mask else image)
        return
    if as_mask:
        assert torch.equal(data.masks[0], decode(image, reference, label=1, size=list(size)).masks[0])
    else:
        assert torch.equal(data.images, decode(reference, size=list(size)).images)


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz("corrupted_bytes")
@given(
    fmt=st.sampled_from(FORMATS),
    seed=seeds,
    size=sizes,
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True, allow_subnormal=False), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_corrupted_bytes_fail_or_decode_to_the_right_shape(
    workdir: Path, fmt: str, seed: int, size: tuple[int, int], flips: list[tuple[float, int]]
) -> None:
    """A few overwritten bytes: a KdadError, or an RGB uint8 image of the requested size (a
    corrupt but decodable file cannot be told from a real picture)."""
    data = bytearray(_real_file(fmt, seed, size))
    for where, value in flips:
        data[int(where * len(data))] = value
    path = write(fresh(workdir) / "x.png", bytes(data))
    try:
        decoded = decode(path, size=[7, 9])
    except KdadError as error:
        assert_clean_error(error, path)
        return
    assert_rgb(decoded, 7, 9)


# =============================================================================================
# pixel formats: grey, palette, 2-channel, RGBA, CMYK, 16-bit, 32-bit
# =============================================================================================
def _pixel_case(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> tuple[bytes, str, np.ndarray]:
    """(file bytes, extension, the expected RGB uint8 [H,W,3] computed without PIL's convert)."""
    height, width = size
    grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (height, width, 1), dtype=np.uint8)
    wide = rng.integers(0, 65536, (height, width, 4), dtype=np.uint16)

    def repeat(g: np.ndarray) -> np.ndarray:
        return np.repeat(g[..., None], 3, axis=2)

    if kind == "1-bit":
        bits = grey > 127
        return encode(Image.fromarray(bits), "PNG"), "png", repeat(bits.astype(np.uint8) * 255)
    if kind == "grey-bmp":
        return encode(Image.fromarray(grey), "BMP"), "bmp", repeat(grey)
    if kind == "grey+alpha (2 channels)":
        return encode(bands(np.dstack([grey, alpha[..., 0]]), "LA"), "PNG"), "png", repeat(grey)
    if kind == "palette":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        img = bands(grey, "P")
        img.putpalette(palette.ravel().tolist())
        return encode(img, "PNG"), "png", palette[grey]
    if kind == "rgb-tiff":
        return encode(Image.fromarray(rgb), "TIFF"), "tif", rgb
    if kind == "rgba (alpha dropped)":
        return encode(Image.fromarray(np.dstack([rgb, alpha])), "PNG"), "png", rgb
    if kind == "cmyk-tiff":
        cmyk = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        c, k = cmyk[..., :3].astype(np.int64), cmyk[..., 3:].astype(np.int64)
        expected = np.rint((255 - c) * (255 - k) / 255.0).astype(np.uint8)
        return encode(bands(cmyk, "CMYK"), "TIFF"), "tiff", expected
    if kind == "grey 16-bit png":
        return png16(wide[..., 0]), "png", repeat((wide[..., 0] >> 8).astype(np.uint8))
    if kind == "grey 16-bit tiff":
        return encode(Image.fromarray(wide[..., 0]), "TIFF"), "tif", repeat((wide[..., 0] >> 8).astype(np.uint8))
    if kind == "rgb 16-bit png":
        return png16(wide[..., :3]), "png", (wide[..., :3] >> 8).astype(np.uint8)
    if kind == "rgba 16-bit png":
        return png16(wide), "png", (wide[..., :3] >> 8).astype(np.uint8)
    if kind == "grey+alpha 16-bit png":
        return png16(wide[..., :2]), "png", repeat((wide[..., 0] >> 8).astype(np.uint8))
    raise AssertionError(kind)


LOSSLESS_KINDS = [
    "1-bit",
    "grey-bmp",
    "grey+alpha (2 channels)",
    "palette",
    "rgb-tiff",
    "rgba (alpha dropped)",
    "cmyk-tiff",
    "grey 16-bit png",
    "grey 16-bit tiff",
    "rgb 16-bit png",
    "rgba 16-bit png",
    "grey+alpha 16-bit png",
]
JPEG_MODES = ["L", "RGB", "CMYK"]


@fuzz("pixel_formats")
@given(kind=st.sampled_from(LOSSLESS_KINDS + JPEG_MODES), seed=seeds, size=sizes, out=sizes)
def test_pixel_formats_decode_to_the_right_rgb(
    workdir: Path, kind: str, seed: int, size: tuple[int, int], out: tuple[int, int]
) -> None:
    rng = np.random.default_rng(seed)
    folder = fresh(workdir)
    if kind in JPEG_MODES:  # lossy: a smooth picture and a tolerance
        height, width = size
        ramp = np.add.outer(np.linspace(0, 1, height), np.linspace(0, 1, width)) / 2
        low, high = rng.integers(0, 128, 4), rng.integers(128, 256, 4)
        ramps = np.stack([np.rint(lo + (hi - lo) * ramp) for lo, hi in zip(low, high)], axis=2).astype(np.uint8)
        source = {"L": ramps[..., 0], "RGB": ramps[..., :3], "CMYK": ramps}[kind]
        if kind == "L":
            expected = np.repeat(source[..., None], 3, axis=2)
        elif kind == "RGB":
            expected = source
        else:
            c, k = source[..., :3].astype(np.int64), source[..., 3:].astype(np.int64)
            expected = np.rint((255 - c) * (255 - k) / 255.0).astype(np.uint8)
        path = write(folder / "x.jpg", encode(bands(source, kind), "JPEG", quality=95, subsampling=0))
        decoded = decode(path).images[0].permute(1, 2, 0).numpy().astype(np.int64)
        assert decoded.shape == expected.shape
        assert np.abs(decoded - expected).mean() <= 4.0
        return

    data, ext, expected = _pixel_case(kind, rng, size)
    path = write(folder / f"x.{ext}", data)
    native = decode(path)
    assert_rgb(native, *size)
    tolerance = 1 if kind == "cmyk-tiff" else 0  # PIL's integer CMYK->RGB rounding
    diff = np.abs(native.images[0].permute(1, 2, 0).numpy().astype(np.int64) - expected.astype(np.int64))
    assert diff.max() <= tolerance, kind
    # at another size: the converted picture, resized with PIL bilinear (the documented recipe)
    resized = decode(path, size=list(out))
    assert_rgb(resized, *out)
    reference = np.asarray(Image.fromarray(native.images[0].permute(1, 2, 0).numpy()).resize(out[::-1], Image.BILINEAR))
    assert np.array_equal(resized.images[0].permute(1, 2, 0).numpy(), reference)


@pytest.mark.parametrize(
    ("array", "fmt"),
    [
        (np.full((4, 5), 0.5, np.float32), "TIFF"),  # 32-bit float
        (np.full((4, 5), 70000, np.int32), "TIFF"),  # 32-bit integer
    ],
)
def test_32_bit_images_are_refused(tmp_path: Path, array: np.ndarray, fmt: str) -> None:
    path = write(tmp_path / "deep image.tif", encode(Image.fromarray(array), fmt))
    with pytest.raises(KdadError, match="8- or 16-bit PNG") as info:
        decode(path)
    assert_clean_error(info.value, path)
    # the same file as a mask is fine: non-zero pixels are defects
    image = write(tmp_path / "x.png", encode(Image.new("RGB", (5, 4)), "PNG"))
    assert decode(image, path, label=1).masks[0].all()


def test_absurd_image_size_in_a_header(tmp_path: Path) -> None:
    """A PNG header claiming 60000x60000 pixels (a decompression bomb) raises, not allocates."""
    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    body = b"IHDR" + header
    data = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body)) + b"\x00" * 64
    path = write(tmp_path / "bomb.png", data)
    with pytest.raises(KdadError) as info:
        decode(path, size=[8, 8])
    assert_clean_error(info.value, path)


# =============================================================================================
# masks: values, bit depths, colour, size
# =============================================================================================
MASK_KINDS = ["L any values", "L sparse 0/k", "1-bit", "palette indices", "RGB any band", "LA", "16-bit", "16-bit tiff"]


def _mask_case(kind: str, rng: np.random.Generator, size: tuple[int, int]) -> tuple[bytes, str, np.ndarray]:
    """(mask file bytes, extension, the expected bool [H,W] defect mask)."""
    height, width = size
    holes = rng.random((height, width)) < rng.random()  # a random share of background pixels
    values = rng.integers(1, 256, (height, width), dtype=np.uint8)
    grey = np.where(holes, 0, values).astype(np.uint8)
    if kind == "L any values":
        return encode(Image.fromarray(grey), "PNG"), "png", grey != 0
    if kind == "L sparse 0/k":
        k = int(rng.integers(1, 256))
        mask = np.where(holes, 0, k).astype(np.uint8)
        return encode(Image.fromarray(mask), "BMP"), "bmp", mask != 0
    if kind == "1-bit":
        return encode(Image.fromarray(~holes), "PNG"), "png", ~holes
    if kind == "palette indices":
        img = bands(grey, "P")
        img.putpalette([255 - i % 256 for i in range(768)])  # index 0 is white: indices count, not colours
        return encode(img, "PNG"), "png", grey != 0
    if kind == "RGB any band":
        band = rng.integers(0, 3, (height, width))
        rgb = np.zeros((height, width, 3), np.uint8)
        np.put_along_axis(rgb, band[..., None], grey[..., None], axis=2)  # one non-zero band, e.g. (0, 0, 1)
        return encode(Image.fromarray(rgb), "PNG"), "png", grey != 0
    if kind == "LA":
        alpha = rng.integers(0, 256, (height, width), dtype=np.uint8)  # ignored
        return encode(bands(np.dstack([grey, alpha]), "LA"), "PNG"), "png", grey != 0
    wide = np.where(holes, 0, rng.integers(1, 65536, (height, width))).astype(np.uint16)
    if kind == "16-bit":
        return png16(wide), "png", wide != 0
    if kind == "16-bit tiff":
        return encode(Image.fromarray(wide), "TIFF"), "tif", wide != 0
    raise AssertionError(kind)


@fuzz("mask_values")
@given(kind=st.sampled_from(MASK_KINDS), seed=seeds, size=sizes, resolution=st.sampled_from(["native", "input"]))
def test_masks_are_binary_aligned_and_keep_their_label(
    workdir: Path, kind: str, seed: int, size: tuple[int, int], resolution: str
) -> None:
    """Any non-zero mask value is a defect (grey value, palette index, any RGB band, 16-bit);
    the mask has the image's geometry; the sample stays anomalous."""
    rng = np.random.default_rng(seed)
    folder = fresh(workdir)
    mask_bytes, ext, expected = _mask_case(kind, rng, size)
    image_array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    image = write(folder / "x.png", encode(Image.fromarray(image_array), "PNG"))
    mask = write(folder / f"x_mask.{ext}", mask_bytes)
    data = decode(image, mask, label=1, mask_resolution=resolution)  # input size = file size here
    assert data.labels.tolist() == [1] and data.mask_known.tolist() == [True]
    got = data.masks[0]
    assert got.dtype == torch.uint8 and set(got.unique().tolist()) <= {0, 1}
    assert tuple(got.shape) == (1, *size) == (1, *data.images.shape[-2:])
    assert np.array_equal(got[0].numpy().astype(bool), expected), kind
    assert np.array_equal(data.images[0].permute(1, 2, 0).numpy(), image_array)


@fuzz("mask_size_mismatch")
@given(image_size=sizes, mask_size=sizes)
def test_mask_of_another_size_is_refused(
    workdir: Path, image_size: tuple[int, int], mask_size: tuple[int, int]
) -> None:
    assume(image_size != mask_size)
    folder = fresh(workdir)
    image = write(folder / "x.png", encode(Image.new("RGB", image_size[::-1]), "PNG"))
    mask = write(folder / "x_mask.png", encode(Image.new("L", mask_size[::-1], 255), "PNG"))
    with pytest.raises(KdadError) as info:
        decode(image, mask, label=1, size=[8, 8], mask_resolution="input")
    assert_clean_error(info.value, image, mask)
    assert f"{mask_size[1]}x{mask_size[0]}" in str(info.value) and f"{image_size[1]}x{image_size[0]}" in str(info.value)


def test_suspicious_masks_keep_their_label_and_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Decided: an anomalous image with an all-zero mask stays anomalous (its folder says so)
    and adds no defect pixels; a warning names it. So do masks whose defect vanishes at the
    input size and masks that are defect everywhere (inverted?)."""
    grey = encode(Image.new("RGB", (64, 64), (50, 60, 70)), "PNG")
    empty = np.zeros((64, 64), np.uint8)
    dot = empty.copy()
    dot[10, 10] = 255
    full = np.full((64, 64), 255, np.uint8)
    samples = []
    for name, mask in (("empty", empty), ("dot", dot), ("full", full)):
        write(tmp_path / f"{name}.png", grey)
        write(tmp_path / f"{name}_mask.png", encode(Image.fromarray(mask), "PNG"))
        samples.append(Sample(tmp_path / f"{name}.png", 1, tmp_path / f"{name}_mask.png", "defect"))
    with caplog.at_level(logging.WARNING, logger="kdad.data.dataset"):
        data = CachedImageDataset(samples, image_size=16, num_threads=1)
    assert data.labels.tolist() == [1, 1, 1]
    assert [int(m.sum()) for m in data.masks] == [0, 0, 256]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert f"mask without any defect pixel (first: {tmp_path / 'empty_mask.png'})" in text
    assert f"lose every defect pixel when resized to the input size (first: {tmp_path / 'dot_mask.png'})" in text
    assert f"mark every pixel as a defect (first: {tmp_path / 'full_mask.png'})" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdad.data.dataset"):
        native = CachedImageDataset(samples[1:2], image_size=16, mask_resolution="native", num_threads=1)
    assert int(native.masks[0].sum()) == 1 and not caplog.records  # native: the dot survives


# =============================================================================================
# layouts: unicode and spaces in every name, missing masks, empty folders
# =============================================================================================
name_chars = st.characters(blacklist_categories=("Cs", "Cc", "Co", "Cn"), blacklist_characters="/\\")
names = st.text(name_chars, min_size=1, max_size=10).filter(
    lambda s: not s.startswith(".") and len(s.encode()) < 60 and s.lower() not in ("good", "ok", "ko")
)


def _picture(value: int, square: tuple[int, int] | None = None) -> tuple[bytes, bytes]:
    """(a 16x16 grey-ish RGB PNG, its 0/255 mask PNG) with a 4x4 square at ``square``."""
    image = np.full((16, 16, 3), value, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    if square is not None:
        r, c = square
        image[r : r + 4, c : c + 4] = 255 - value
        mask[r : r + 4, c : c + 4] = 255
    return encode(Image.fromarray(image), "PNG"), encode(Image.fromarray(mask), "PNG")


def _check_decoded(samples: list[Sample], expected: dict[str, tuple[int, tuple[int, int] | None]]) -> None:
    """Labels, image content and masks match what was written (``expected[path] = (label, square)``)."""
    assert {str(s.image_path): s.label for s in samples} == {p: v[0] for p, v in expected.items()}
    data = CachedImageDataset(samples, image_size=16, num_threads=2)  # the thread-pool path
    for i, sample in enumerate(samples):
        label, square = expected[str(sample.image_path)]
        mask = torch.zeros(1, 16, 16, dtype=torch.uint8)
        if square is not None:
            mask[:, square[0] : square[0] + 4, square[1] : square[1] + 4] = 1
        assert torch.equal(data.masks[i], mask), sample
        assert int(data.labels[i]) == label
        assert data.paths[i] == str(sample.image_path)


@fuzz("unicode_layouts")
@given(
    category=names,
    defect=names,
    stems=st.lists(names, min_size=3, max_size=3, unique=True),
    squares=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=3, max_size=3),
)
def test_layouts_with_unicode_and_spaces(
    workdir: Path, category: str, defect: str, stems: list[str], squares: list[tuple[int, int]]
) -> None:
    """MVTec, BTAD, KSDD2, VisA and folder layouts whose category, defect and file names hold
    arbitrary unicode letters, spaces, braces, etc.: every image is found with its label and
    its mask."""
    assume(not any(s.endswith("_GT") for s in stems) and category != defect)
    root = fresh(workdir)
    a, b, c = stems

    # MVTec layout: train a, test good b, test <defect> c with its mask
    base = root / "mvtec" / category
    write(base / "train" / "good" / f"{a}.png", _picture(40)[0])
    write(base / "test" / "good" / f"{b}.png", _picture(60)[0])
    image, mask = _picture(80, squares[2])
    write(base / "test" / defect / f"{c}.png", image)
    write(base / "ground_truth" / defect / f"{c}_mask.png", mask)
    dm = AnomalyDataModule(format="mvtec", root=str(root / "mvtec"), category=category, image_size=16, num_workers=0)
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.train_dataset.paths == [str(base / "train" / "good" / f"{a}.png")]
    test = read_mvtec(root / "mvtec", category, "test")
    _check_decoded(
        test,
        {
            str(base / "test" / "good" / f"{b}.png"): (0, None),
            str(base / "test" / defect / f"{c}.png"): (1, squares[2]),
        },
    )

    # BTAD layout
    base = root / "btad" / category
    write(base / "train" / "ok" / f"{a}.bmp", encode(Image.open(io.BytesIO(_picture(40)[0])), "BMP"))
    write(base / "test" / "ok" / f"{b}.png", _picture(60)[0])
    write(base / "test" / "ko" / f"{c}.png", image)
    write(base / "ground_truth" / "ko" / f"{c}.png", mask)
    assert [s.image_path.name for s in read_btad(root / "btad", category, "train")] == [f"{a}.bmp"]
    _check_decoded(
        read_btad(root / "btad", category, "test"),
        {str(base / "test" / "ok" / f"{b}.png"): (0, None), str(base / "test" / "ko" / f"{c}.png"): (1, squares[2])},
    )

    # KolektorSDD2: the label comes from the mask beside the image
    base = root / "ksdd2"
    for split in ("train", "test"):
        for stem, square in zip(stems, squares):
            defective = square if stem != a else None
            img, msk = _picture(90, defective)
            write(base / split / f"{stem}.png", img)
            write(base / split / f"{stem}_GT.png", msk)
    assert [s.image_path.name for s in read_ksdd2(base, "train")] == [f"{a}.png"]
    _check_decoded(
        read_ksdd2(base, "test"),
        {str(base / "test" / f"{s}.png"): (0 if s == a else 1, None if s == a else q) for s, q in zip(stems, squares)},
    )

    # VisA: a UTF-8 split file naming unicode paths
    base = root / "visa"
    rows = [("train", "normal", f"{category}/Data/Images/Normal/{a}.png", "")]
    rows.append(("test", "normal", f"{category}/Data/Images/Normal/{b}.png", ""))
    rows.append(
        ("test", "anomaly", f"{category}/Data/Images/Anomaly/{c}.png", f"{category}/Data/Masks/Anomaly/{c}.png")
    )
    for _, _, image_rel, mask_rel in rows:
        write(base / image_rel, image if mask_rel else _picture(60)[0])
        if mask_rel:
            write(base / mask_rel, mask)
    (base / "split_csv").mkdir(parents=True, exist_ok=True)
    with (base / "split_csv" / "1cls.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows([(category, *row) for row in rows])
    assert [s.image_path for s in read_visa(base, category, "train")] == [base / rows[0][2]]
    _check_decoded(
        read_visa(base, category, "test"), {str(base / rows[1][2]): (0, None), str(base / rows[2][2]): (1, squares[2])}
    )

    # a user's folders, without masks: the anomalous image is anomalous with an unknown mask
    normal, abnormal = root / "folder" / category, root / "folder" / defect
    for stem in stems:
        write(normal / f"{stem}.png", _picture(40)[0])
    write(abnormal / f"{c}.png", image)
    samples = read_folder(normal, abnormal, split="test", test_split_ratio=0.34)
    assert [s.label for s in samples] == [0, 1] and samples[1].mask_path is None
    batch = collate([CachedImageDataset(samples, image_size=16, num_threads=1)[i] for i in range(2)])
    assert batch.label.tolist() == [0, 1]
    assert isinstance(batch.mask, torch.Tensor) and bool((batch.mask[1] == MASK_UNKNOWN).all())
    assert batch.path[1] == str(abnormal / f"{c}.png")


def _mvtec_with_defect(root: Path) -> Path:
    write(root / "cat" / "train" / "good" / "a.png", _picture(40)[0])
    write(root / "cat" / "test" / "crack" / "b.png", _picture(80, (2, 2))[0])
    return root / "cat" / "test" / "crack" / "b.png"


def test_missing_masks_never_become_good(tmp_path: Path) -> None:
    """An image in a defect folder without its mask raises (every layout that has masks);
    only the folder layout without mask_dir accepts it, as anomalous with an unknown mask."""
    image = _mvtec_with_defect(tmp_path / "mvtec")
    with pytest.raises(KdadError, match="has no mask") as info:
        read_mvtec(tmp_path / "mvtec", "cat", "test")
    assert_clean_error(info.value, image)

    write(tmp_path / "btad" / "c" / "train" / "ok" / "a.png", _picture(40)[0])
    ko = write(tmp_path / "btad" / "c" / "test" / "ko" / "b.png", _picture(80)[0])
    (tmp_path / "btad" / "c" / "ground_truth" / "ko").mkdir(parents=True)
    with pytest.raises(KdadError, match="has no mask") as info:
        read_btad(tmp_path / "btad", "c", "test")
    assert_clean_error(info.value, ko)

    ksdd = write(tmp_path / "ksdd2" / "test" / "b.png", _picture(80)[0])
    with pytest.raises(KdadError, match="no ground-truth mask") as info:
        read_ksdd2(tmp_path / "ksdd2", "test")
    assert_clean_error(info.value, ksdd)

    visa = tmp_path / "visa"
    write(visa / "x" / "b.png", _picture(80)[0])
    write(visa / "split_csv" / "1cls.csv", b"object,split,label,image,mask\nx,test,anomaly,x/b.png,x/b_mask.png\n")
    with pytest.raises(KdadError, match="has no mask") as info:
        read_visa(visa, "x", "test")
    assert_clean_error(info.value, visa / "x" / "b.png")

    normal = tmp_path / "folder" / "normal"
    for i in range(3):
        write(normal / f"{i}.png", _picture(40)[0])
    abnormal = write(tmp_path / "folder" / "bad" / "b.png", _picture(80)[0])
    (tmp_path / "folder" / "masks").mkdir()
    with pytest.raises(KdadError, match="has no mask") as info:
        read_folder(normal, abnormal.parent, tmp_path / "folder" / "masks", split="test")
    assert_clean_error(info.value, abnormal)
    samples = read_folder(normal, abnormal.parent, split="test")
    assert [(s.label, s.mask_path, s.mask_known) for s in samples][-1] == (1, None, False)


def test_empty_folders_raise(tmp_path: Path) -> None:
    (tmp_path / "mvtec" / "cat" / "train" / "good").mkdir(parents=True)
    (tmp_path / "mvtec" / "cat" / "test" / "good").mkdir(parents=True)
    for split in ("train", "test"):
        with pytest.raises(KdadError, match=r"no (training|test) images") as info:
            read_mvtec(tmp_path / "mvtec", "cat", split)
        assert_clean_error(info.value, tmp_path / "mvtec" / "cat" / split)
    (tmp_path / "btad" / "c" / "train" / "ok").mkdir(parents=True)
    with pytest.raises(KdadError, match="no training images"):
        read_btad(tmp_path / "btad", "c", "train")
    (tmp_path / "ksdd2" / "train").mkdir(parents=True)
    with pytest.raises(KdadError, match="no KolektorSDD2 train images"):
        read_ksdd2(tmp_path / "ksdd2", "train")
    (tmp_path / "normal").mkdir()
    with pytest.raises(KdadError, match="no normal images") as info:
        read_folder(tmp_path / "normal", split="train")
    assert_clean_error(info.value, tmp_path / "normal")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KdadError, match="category 'cat' not found"):
        read_mvtec(empty, "cat", "train")


def test_broken_link_is_an_error_not_a_missing_sample(tmp_path: Path) -> None:
    image = _mvtec_with_defect(tmp_path)
    link = image.parent / "c.png"
    link.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(KdadError, match="broken link") as info:
        read_mvtec(tmp_path, "cat", "test")
    assert_clean_error(info.value, link)


def test_bad_file_through_the_datamodule(tmp_path: Path) -> None:
    """A corrupt training image stops ``setup`` with the one-line error (thread-pool decoding)."""
    root = tmp_path / "my data"
    for i in range(4):
        write(root / "cat" / "train" / "good" / f"{i}.png", _picture(40)[0])
    bad = write(root / "cat" / "train" / "good" / "3.png", _picture(40)[0][:40])
    write(root / "cat" / "test" / "good" / "a.png", _picture(40)[0])
    dm = AnomalyDataModule(format="mvtec", root=str(root), category="cat", image_size=16, num_workers=0)
    with pytest.raises(KdadError, match="cannot read image") as info:
        dm.setup("fit")
    assert_clean_error(info.value, bad)


@fuzz("visa_csv_bytes")
@given(
    header=st.sampled_from([b"", b"object,split,label,image,mask\n", b"\xef\xbb\xbfobject,split,label,image,mask\r\n"]),
    body=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
)
def test_random_visa_split_files(workdir: Path, header: bytes, body: bytes) -> None:
    root = fresh(workdir)
    csv_path = write(root / "split_csv" / "1cls.csv", header + body)
    try:
        samples = read_visa(root, "x", "train")
    except KdadError as error:  # random bytes: either a clean error or readable samples
        assert_clean_error(error)
        assert str(csv_path) in str(error) or str(root) in str(error)  # noqa: PT017 - the input decides
        return
    assert all(s.image_path.is_file() for s in samples)


# =============================================================================================
# checkpoints (read_checkpoint is helper "export"'s; fuzzed here)
# =============================================================================================
@pytest.fixture(scope="module")
def checkpoint_bytes(workdir: Path) -> bytes:
    """A small checkpoint shaped like kdad's (state_dict + kdad metadata), saved by torch.save."""
    checkpoint = {
        "epoch": 1,
        "global_step": 8,
        "pytorch-lightning_version": "2.x",
        "state_dict": {
            "decoder.weight": torch.arange(64.0).reshape(8, 8),
            "decoder.bn.running_mean": torch.zeros(8),
            "decoder.bn.num_batches_tracked": torch.tensor(3),
        },
        "kdad": {
            "format": 1,
            "version": "0.1.0",
            "method": "rd",
            "hparams": {"backbone": "resnet18", "weights": "none"},
            "datamodule": {"image_size": [32, 32]},
            "thresholds": None,
        },
    }
    path = workdir / "reference.ckpt"
    torch.save(checkpoint, path)
    return path.read_bytes()


def _read_or_error(path: Path) -> dict[str, Any] | None:
    try:
        return read_checkpoint(path)
    except KdadError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message
        return None


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch warns about odd pickle protocols
@fuzz("checkpoint_bytes")
@given(body=st.binary(max_size=2000), zip_magic=st.booleans())
def test_random_bytes_as_checkpoint(workdir: Path, body: bytes, zip_magic: bool) -> None:
    path = write(fresh(workdir) / "model.ckpt", (b"PK\x03\x04" if zip_magic else b"") + body)
    assert _read_or_error(path) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz("checkpoint_truncated")
@given(fraction=st.floats(0.0, 1.0, exclude_max=True, allow_subnormal=False))
def test_truncated_checkpoint(workdir: Path, checkpoint_bytes: bytes, fraction: float) -> None:
    path = write(fresh(workdir) / "model.ckpt", checkpoint_bytes[: int(fraction * len(checkpoint_bytes))])
    assert _read_or_error(path) is None


@pytest.mark.filterwarnings("ignore::UserWarning")
@fuzz("checkpoint_bit_flips")
@given(
    flips=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True, allow_subnormal=False), st.integers(1, 255)),
        min_size=1,
        max_size=3,
    )
)
def test_corrupted_checkpoint_is_refused_or_intact(
    workdir: Path, checkpoint_bytes: bytes, flips: list[tuple[float, int]]
) -> None:
    reference = torch.load(io.BytesIO(checkpoint_bytes), weights_only=True)
    data = bytearray(checkpoint_bytes)
    for where, delta in flips:
        index = int(where * len(data))
        data[index] = (data[index] + delta) % 256
    path = write(fresh(workdir) / "model.ckpt", bytes(data))
    loaded = _read_or_error(path)
    if loaded is None:
        return
    assert loaded["kdad"] == reference["kdad"]
    assert loaded["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(loaded["state_dict"][key], value), key
