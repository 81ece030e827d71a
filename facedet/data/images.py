"""Reading images: the one place where an image file becomes a tensor.

:func:`read_image` returns a uint8 3×H×W RGB tensor for every common format
(JPEG, PNG with 8 or 16 bits per sample, grayscale, RGBA, palette, BMP, WebP,
GIF, TIFF, ...) or raises :class:`ImageError` with one line naming the file
and why it was refused.  Alpha is dropped, 16-bit samples keep their high
byte (``v >> 8``, as libpng's ``strip_16`` and PIL do), and of an animated
file the first frame is used.

**Pixel limit.**  Before anything is decoded, the size is read from the
file's header (the PNG IHDR chunk, the JPEG SOF marker, PIL's header parser
for the other formats) and an image with more pixels than the limit is
refused, so that a small file declaring a huge size cannot exhaust memory.
The limit is :data:`DEFAULT_MAX_PIXELS` (40 megapixels), or the
``COMPRESSOR_MAX_PIXELS`` environment variable, or the caller's value
(``compress detect --max-pixels``).  Callers that pad the image before the
network sees it name the padding (``square``, ``multiple``) and the limit
applies to the padded size, which is what gets allocated.

Everything is decoded by PIL.  Not torchvision's ``decode_image``: it
decodes before any size check, its libpng path crashes the process
(segmentation fault) on some corrupt PNGs and prints libpng/libjpeg messages
straight to the terminal.  For JPEG, PIL and torchvision use the same
libjpeg-turbo settings and give identical pixels (checked on the embedded
dataset and on 4:4:4 / 4:2:2 / 4:2:0, gray and CMYK files), so training and
evaluation see the images exactly as before.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "ImageError",
    "image_size",
    "max_pixels_limit",
    "padded_size",
    "read_image",
]

DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "COMPRESSOR_MAX_PIXELS"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers: every SOFn except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: markers without a length field
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# PIL's plugins report a corrupt file with all of these, depending on the format.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError, KeyError, struct.error, zlib.error)


class ImageError(DataError):
    """An image file that cannot be used; the message names the file and why."""


# ------------------------------------------------------------------ the limit


def max_pixels_limit(value: int | None = None) -> int:
    """The pixel limit: ``value`` if given, else ``$COMPRESSOR_MAX_PIXELS``, else 40,000,000."""
    if value is not None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ImageError(f"max pixels: {value!r} is not a positive integer")
        return value
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ImageError(f"environment variable {MAX_PIXELS_ENV}={raw!r}: not a positive integer (pixels per image)")
    return limit


def padded_size(height: int, width: int, square: bool = False, multiple: int = 1) -> tuple[int, int]:
    """(height, width) after padding to a square of the longer side and/or up to a multiple."""
    if square:
        height = width = max(height, width)
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def _check_limit(path: Path, height: int, width: int, limit: int, square: bool, multiple: int,
                 hint: str | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"{path}: the header declares width {width}, height {height}")
    padded_h, padded_w = padded_size(height, width, square, multiple)
    pixels = padded_h * padded_w
    if pixels <= limit:
        return
    size = f"width {width}, height {height}"
    if (padded_h, padded_w) != (height, width):
        size += f", padded to width {padded_w}, height {padded_h}"
    hint = hint or f"set {MAX_PIXELS_ENV} to raise it"
    raise ImageError(f"{path}: image too large: {size} = {pixels:,} pixels, over the limit of {limit:,} ({hint})")


# ------------------------------------------------------------------ headers


def _png_size(head: bytes, path: Path) -> tuple[int, int]:
    """(height, width) from the IHDR chunk, which must come first."""
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise ImageError(f"{path}: truncated or invalid PNG (no IHDR chunk at the start)")
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _jpeg_size(handle, path: Path) -> tuple[int, int]:
    """(height, width) from the first start-of-frame marker."""
    handle.seek(2)
    while True:
        byte = handle.read(1)
        if not byte:
            raise ImageError(f"{path}: truncated JPEG (no frame header before the end of the file)")
        if byte != b"\xff":
            raise ImageError(f"{path}: corrupt JPEG (expected a marker at byte {handle.tell() - 1})")
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes
            marker = handle.read(1)
        if not marker:
            raise ImageError(f"{path}: truncated JPEG (no frame header before the end of the file)")
        code = marker[0]
        if code in _JPEG_NO_LENGTH:
            continue
        if code in (0xD8, 0xD9, 0xDA):
            raise ImageError(f"{path}: corrupt JPEG (no frame header before the image data)")
        segment = handle.read(2)
        if len(segment) < 2:
            raise ImageError(f"{path}: truncated JPEG (no frame header before the end of the file)")
        length = int.from_bytes(segment, "big")
        if code in _JPEG_SOF:
            frame = handle.read(5)
            if len(frame) < 5:
                raise ImageError(f"{path}: truncated JPEG frame header")
            return int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
        if length < 2:
            raise ImageError(f"{path}: corrupt JPEG (segment length {length} at byte {handle.tell() - 2})")
        handle.seek(length - 2, os.SEEK_CUR)


@contextmanager
def _quiet_pil() -> Iterator[None]:
    """Silence PIL's warnings and log records about a damaged file while it is read.

    Whatever is wrong ends as one ImageError (or the image is usable); PIL's
    own lines on stderr (``UserWarning: Truncated File Read``, TIFF's logged
    errors) would come on top of that one line.
    """
    pil_logger = logging.getLogger("PIL")
    level = pil_logger.level
    pil_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pil_logger.setLevel(level)


def _open_pil(path: Path):
    """PIL's lazy image (header read, nothing decoded), errors as ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _quiet_pil():
            return Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image in a known format (JPEG, PNG, BMP, WebP, GIF, TIFF, ...)") from None
    except Image.DecompressionBombError:
        limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise ImageError(f"{path}: image too large: over {limit:,} pixels, more than PIL will open") from None
    except _PIL_ERRORS as err:  # SyntaxError: PIL's "not a ... file" in some plugins
        raise ImageError(f"{path}: cannot read the image header ({str(err).strip() or type(err).__name__})") from None


def _sniff(path: Path) -> tuple[int, int] | None:
    """(height, width) of a PNG or JPEG from its header; None for other formats (PIL reads those)."""
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a regular file")
    try:
        with path.open("rb") as handle:
            head = handle.read(32)
            if head.startswith(_PNG_SIGNATURE):
                return _png_size(head, path)
            if head.startswith(_JPEG_SOI):
                return _jpeg_size(handle, path)
    except OSError as err:
        raise ImageError(f"{path}: cannot read the file ({err.strerror or err})") from None
    if not head:
        raise ImageError(f"{path}: empty file, not an image")
    return None


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) from the file's header; nothing is decoded."""
    path = Path(path)
    size = _sniff(path)
    if size is not None:
        return size
    with _open_pil(path) as image:
        return image.height, image.width


# ------------------------------------------------------------------ decoding


def _pil_decode(path: Path, image) -> torch.Tensor:
    with _quiet_pil():
        return _pil_decode_quietly(path, image)


def _pil_decode_quietly(path: Path, image) -> torch.Tensor:
    from PIL import Image

    try:
        image.seek(0)  # first frame of an animation
        if image.mode in _SIXTEEN_BIT_MODES:
            # PIL keeps 16-bit grayscale as is (RGB it reduces itself): keep the high byte too.
            gray = torch.from_numpy((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
            return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
        if image.mode in ("I", "F"):
            kind = "32-bit integer" if image.mode == "I" else "32-bit float"
            raise ImageError(f"{path}: unsupported pixel format ({kind} samples); save it with 8 or 16 bits")
        rgb = np.asarray(image.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError:  # a frame or layer larger than the header said
        raise ImageError(f"{path}: image too large: a part of it is over PIL's decompression-bomb limit") from None
    except _PIL_ERRORS as err:
        raise ImageError(f"{path}: cannot decode the image ({str(err).strip() or type(err).__name__})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageError(f"{path}: unexpected decoded layout {rgb.shape} {rgb.dtype}")
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def read_image(
    path: str | Path,
    max_pixels: int | None = None,
    *,
    square: bool = False,
    multiple: int = 1,
    hint: str | None = None,
) -> torch.Tensor:
    """Decode ``path`` to a uint8 3×H×W RGB tensor, or raise :class:`ImageError`.

    The size is checked against the pixel limit (:func:`max_pixels_limit` of
    ``max_pixels``) from the header, before decoding; with ``square`` and/or
    ``multiple`` the limit applies to the size after that padding.  ``hint``
    replaces the message's "how to raise the limit" part.
    """
    path = Path(path)
    limit = max_pixels_limit(max_pixels)
    size = _sniff(path)
    if size is not None:  # PNG, JPEG: refused from our own header reading, before PIL sees the file
        _check_limit(path, *size, limit, square, multiple, hint)
    with _open_pil(path) as opened:
        # Also on PIL's reading of the header: a file the two read differently must not slip through.
        _check_limit(path, opened.height, opened.width, limit, square, multiple, hint)
        image = _pil_decode(path, opened)
    if tuple(image.shape[-2:]) != (opened.height, opened.width):
        raise ImageError(f"{path}: decoded size {tuple(image.shape[-2:])} differs from the header's "
                         f"{(opened.height, opened.width)}")
    return image
