"""Fetch, decode and normalise product images for the image encoder.

Catalog rows point at images by URI (local path, ``file://``, ``gs://`` or any
other Beam filesystem, or ``http(s)://``). One bad image must never fail a
bundle: every fetch or decode failure becomes an :class:`ImageError`, a
:class:`DataError` whose stable ``reason`` code sends the item to
``degraded/``. Inputs are untrusted, so fetched bytes and decoded pixels are
both bounded (a small file can declare a huge canvas: a decompression bomb),
and the pixel check happens on the header, before any pixel is decoded.
"""

from __future__ import annotations

import http.client
import io
import logging
import struct
import time
import urllib.error
import urllib.request

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageOps, UnidentifiedImageError

from catalog_index.errors import DataError
from schemas.rejected import IMAGE_DECODE_FAILED, IMAGE_FETCH_FAILED, IMAGE_TOO_LARGE

_log = logging.getLogger(__name__)

# 40 Mpx covers any real product photo (a 45 Mpx camera is the odd exception)
# while capping a decoded RGBA frame at ~160 MB per worker thread.
DEFAULT_MAX_PIXELS = 40_000_000
# Far above any sane product photo; stops a mislabelled video or a huge TIFF
# from being pulled into memory whole.
DEFAULT_MAX_BYTES = 50 * 1024 * 1024

# Only formats that product feeds actually use. Restricting Image.open keeps
# Pillow's rarely exercised plugins (PSD, TGA, EPS via Ghostscript...) off
# untrusted input. "JPEG" also yields MPO files (multi-picture JPEGs written
# by phones), which Pillow opens through the JPEG plugin.
_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP")

_READ_CHUNK = 1024 * 1024
_USER_AGENT = "catalog-index-image-fetch/1.0"

# What Pillow raises on corrupt or truncated data. It is not only OSError:
# plugins parse headers with struct and plain indexing, so a hostile file can
# surface as nearly any of these.
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    ZeroDivisionError,
    struct.error,
)

_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(DataError):
    """An item's image is unusable; ``reason`` is one of schemas.rejected.IMAGE_REASONS."""

    reason = IMAGE_FETCH_FAILED


class ImageFetchError(ImageError):
    """The image bytes could not be read (missing file, HTTP error, timeout, empty)."""

    reason = IMAGE_FETCH_FAILED


class ImageDecodeError(ImageError):
    """The bytes are not a supported image, or are corrupt or truncated."""

    reason = IMAGE_DECODE_FAILED


class ImageTooLargeError(ImageError):
    """The image exceeds the byte or decoded-pixel bound."""

    reason = IMAGE_TOO_LARGE


def _named(uri):
    return f" {uri!r}" if uri is not None else ""


def _describe(exc):
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_size(size):
    """Validates a (height, width) pair; a bad size is a programming error, not data."""
    try:
        height, width = size
    except (TypeError, ValueError):
        raise ValueError(f"size must be a (height, width) pair, got {size!r}") from None
    _check_positive("size height", height)
    _check_positive("size width", width)
    return height, width


# --------------------------------------------------------------------------- fetch


def _read_bounded(read, max_bytes, uri, deadline=None):
    """Calls ``read(n)`` until EOF, but never takes more than max_bytes + 1 bytes.

    Reading one byte past the bound is how an over-large body is detected
    without trusting a Content-Length header or a file size.
    """
    chunks = []
    total = 0
    while True:
        chunk = read(min(_READ_CHUNK, max_bytes + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLargeError(
                f"image {uri!r} is larger than the {max_bytes}-byte limit"
            )
        # urllib's timeout bounds each socket operation, not the whole body; a
        # server that drips bytes would otherwise hold a worker indefinitely.
        if deadline is not None and time.monotonic() > deadline:
            raise ImageFetchError(f"timed out reading image {uri!r}")
    return b"".join(chunks)


def _fetch_http(uri, max_bytes, timeout):
    deadline = None if timeout is None else time.monotonic() + timeout
    request = urllib.request.Request(uri, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > max_bytes:
                raise ImageTooLargeError(
                    f"image {uri!r} declares {int(length)} bytes, "
                    f"over the {max_bytes}-byte limit"
                )
            # read1 returns what has arrived instead of blocking for a full
            # chunk, so the deadline is checked while a slow body trickles in.
            return _read_bounded(response.read1, max_bytes, uri, deadline)
    except ImageError:
        raise
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ImageFetchError(
            f"HTTP {exc.code} {exc.reason} fetching image {uri!r}"
        ) from exc
    # URLError and socket timeouts are OSErrors; HTTPException covers broken
    # responses (IncompleteRead, BadStatusLine); ValueError a malformed URL.
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ImageFetchError(
            f"cannot fetch image {uri!r}: {_describe(exc)}"
        ) from exc


def _fetch_filesystem(uri, max_bytes):
    # Beam's LocalFileSystem wants a plain path; "file://" is stripped as-is
    # (no percent-decoding), so "file:///a/b.jpg" reads "/a/b.jpg".
    path = uri[len("file://"):] if uri[:7].lower() == "file://" else uri
    try:
        # UNCOMPRESSED: the default AUTO would gunzip a name ending in ".gz"
        # (or ".bz2", ...) behind our back; image bytes are what we want.
        stream = FileSystems.open(
            path,
            mime_type="application/octet-stream",
            compression_type=CompressionTypes.UNCOMPRESSED,
        )
        try:
            return _read_bounded(stream.read, max_bytes, uri)
        finally:
            stream.close()
    except ImageError:
        raise
    except (OSError, ValueError) as exc:
        # OSError: missing file, permissions, a directory, BeamIOError.
        # ValueError: no filesystem for the scheme, or its extra not installed.
        raise ImageFetchError(f"cannot read image {uri!r}: {_describe(exc)}") from exc
    except Exception as exc:  # pylint: disable=broad-except
        # Remote filesystem clients raise their own types (for example
        # google.api_core.exceptions.NotFound / Forbidden for gs://), which are
        # not OSErrors. The try block covers only library I/O, so anything
        # here is about this one URI and must not fail the bundle.
        raise ImageFetchError(f"cannot read image {uri!r}: {_describe(exc)}") from exc


def fetch_image_bytes(uri: str, max_bytes: int = DEFAULT_MAX_BYTES, timeout: float = 30.0) -> bytes:
    """Returns the raw bytes of the image at ``uri``.

    ``http://`` and ``https://`` go through urllib (``timeout`` bounds each
    socket operation and, roughly, the whole read); anything else (a local
    path, ``file://``, ``gs://``, any scheme Beam knows) through Beam's
    FileSystems, with no automatic decompression.

    Raises ImageFetchError when the bytes cannot be read, including an empty
    file (zero bytes means the upload or copy never happened: a fetch problem,
    not a bad encoding), and ImageTooLargeError over ``max_bytes``.
    """
    _check_positive("max_bytes", max_bytes)
    if not isinstance(uri, str) or not uri.strip():
        raise ImageFetchError(f"empty image URI {uri!r}")
    lowered = uri[:8].lower()
    if lowered.startswith(("http://", "https://")):
        data = _fetch_http(uri, max_bytes, timeout)
    else:
        data = _fetch_filesystem(uri, max_bytes)
    if not data:
        raise ImageFetchError(f"image {uri!r} is empty (0 bytes)")
    return data


# -------------------------------------------------------------------------- decode


def _high_bit_depth_to_rgb(img):
    """Scales 16/32-bit grayscale to 8 bits; Pillow's convert() would clip at 255.

    Among the supported formats only 16-bit PNG yields these modes ("I;16",
    or "I" from older Pillow), so "I" is read as 16-bit too. "F" (float) is
    clipped to [0, 255], as Pillow itself does.
    """
    values = np.asarray(img, dtype=np.float64)
    if img.mode != "F":
        values = values / 257.0  # 65535 -> 255 exactly
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _to_rgb(img):
    """Converts any Pillow mode to RGB, compositing alpha onto white.

    White, not black: a product cut out on a transparent background is meant
    to look like the catalogue shot on white it replaces, and that is what
    the encoder saw for every other product. Black would also turn the fully
    transparent RGB (0, 0, 0) pixels of many PNGs into a black frame.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    # Palette, L and RGB images may carry a transparent colour in "transparency"
    # (PNG tRNS, GIF); convert("RGBA") turns it into real alpha.
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_depth_to_rgb(img)
    # L, 1, P without transparency, CMYK, YCbCr: Pillow's conversions are right.
    # CMYK ignores any ICC profile (a plain naive conversion).
    return img.convert("RGB")


def decode_image(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    uri: str | None = None,
    *,
    min_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decodes JPEG, PNG, GIF, BMP or WebP bytes into an upright RGB image.

    The canvas size declared in the header is checked against ``max_pixels``
    before any pixel is decoded. EXIF orientation is applied; animated GIF or
    WebP yield their first frame. ``uri`` only names the image in errors.

    ``min_size`` (height, width), when given, lets a JPEG be decoded at 1/2,
    1/4 or 1/8 scale (DCT scaling, much faster on big photos) as long as
    both sides stay at least max(min_size); load_image passes its target size.

    Raises ImageTooLargeError over ``max_pixels``, ImageDecodeError otherwise.
    """
    _check_positive("max_pixels", max_pixels)
    if min_size is not None:
        _check_size(min_size)
    where = _named(uri)
    if not data:
        raise ImageDecodeError(f"image{where} is empty (0 bytes)")

    try:
        # Opening only parses the header. Pillow's own bomb check may fire here
        # (over 2x its global MAX_IMAGE_PIXELS); our bound below is independent
        # of that global, which we neither rely on nor change.
        img = Image.open(io.BytesIO(data), formats=list(_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # The warning only arrives as an exception under "-W error"-style
        # filters; either way it means the canvas is huge.
        raise ImageTooLargeError(f"image{where} is too large to decode safely: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"image{where} is not a readable {', '.join(_FORMATS)} image"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise ImageDecodeError(f"cannot decode image{where}: {_describe(exc)}") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image{where} declares an empty canvas {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image{where} is {width}x{height} = {width * height} pixels, "
            f"over the {max_pixels}-pixel limit"
        )

    try:
        if min_size is not None:
            # A no-op for everything but JPEG. max() on both sides keeps the
            # draft large enough whichever way EXIF later rotates it, and a
            # centre crop to the target aspect keeps one full side, so the
            # crop is still at least the target size.
            side = max(min_size)
            img.draft(None, (side, side))
        # Image.open leaves the first frame current and we never seek, so
        # animated GIF / WebP decode only their first frame.
        img.load()
        img = _apply_exif_orientation(img, uri)
        return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image{where} is too large to decode safely: {exc}") from exc
    except _DECODE_ERRORS as exc:
        # Truncated files land here: Pillow raises OSError ("image file is
        # truncated") unless the global LOAD_TRUNCATED_IMAGES is set, which we
        # leave alone so a half-downloaded photo is rejected, not half grey.
        raise ImageDecodeError(f"cannot decode image{where}: {_describe(exc)}") from exc


def _apply_exif_orientation(img, uri):
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as exc:  # pylint: disable=broad-except
        # A malformed EXIF block (common from cheap cameras and editors) can
        # raise nearly anything from the EXIF parser. The pixels are fine, so
        # keep the image unrotated rather than lose it.
        _log.debug("ignoring unreadable EXIF orientation of image%s: %s", _named(uri), exc)
    return img


# --------------------------------------------------------------------- model input


def _center_crop_box(src_width, src_height, width, height):
    """Largest centred integer box with the target aspect ratio (at least 1x1)."""
    if src_width * height > width * src_height:  # source wider than target
        crop_width = max(1, min(src_width, round(src_height * width / height)))
        left = (src_width - crop_width) // 2
        return (left, 0, left + crop_width, src_height)
    crop_height = max(1, min(src_height, round(src_width * height / width)))
    top = (src_height - crop_height) // 2
    return (0, top, src_width, top + crop_height)


def to_model_input(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Centre-crops ``img`` to the aspect of ``size`` = (height, width) and resizes.

    Returns float32 [height, width, 3] in [0, 1]. Small images are upscaled.
    Non-RGB images are converted as decode_image does (alpha onto white).
    """
    height, width = _check_size(size)
    img = _to_rgb(img)
    box = _center_crop_box(img.width, img.height, width, height)
    # An explicit crop, not resize(box=...): Pillow's filters read pixels just
    # outside a resize box, so the cropped-away margins would bleed into the
    # edges. reducing_gap first shrinks big photos by an integer factor (cheap
    # box filter) and finishes with bilinear; with a gap of 3 the result is
    # indistinguishable from a full bilinear resize.
    if box != (0, 0, img.width, img.height):
        img = img.crop(box)
    resized = img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels.astype(np.float32) / np.float32(255.0)


def load_image(
    uri: str,
    size: tuple[int, int],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    timeout: float = 30.0,
) -> np.ndarray:
    """Fetches, decodes and prepares one image: float32 [height, width, 3] in [0, 1].

    Every data failure raises an ImageError subclass; a bad ``size`` or bound
    is a programming error and raises ValueError before anything is fetched.
    """
    _check_size(size)
    _check_positive("max_pixels", max_pixels)
    data = fetch_image_bytes(uri, max_bytes=max_bytes, timeout=timeout)
    img = decode_image(data, max_pixels=max_pixels, uri=uri, min_size=size)
    return to_model_input(img, size)
