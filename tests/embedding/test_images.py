"""Tests for embedding.images: every image is generated here with Pillow, no network."""

import functools
import http.server
import io
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from schemas.errors import DataError
from embedding import images
from embedding.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageError,
    ImageFetchError,
    ImageTooLargeError,
    decode_image,
    fetch_image_bytes,
    load_image,
    to_model_input,
)
from schemas.rejected import IMAGE_DECODE_FAILED, IMAGE_FETCH_FAILED, IMAGE_TOO_LARGE

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)


# ----------------------------------------------------------------------- helpers


def encode(img, fmt, **params):
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


def halves(width, height, left=RED, right=BLUE):
    """An RGB image whose left half is `left` and right half is `right`."""
    img = Image.new("RGB", (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind, payload):
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    )


def png_declaring(width, height):
    """A syntactically valid PNG whose header declares width x height RGB pixels.

    Only a few bytes of (zero) pixel data follow: nothing big is ever allocated
    unless a decoder trusts the header and decodes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def assert_model_array(arr, size):
    assert isinstance(arr, np.ndarray)
    assert arr.dtype == np.float32
    assert arr.shape == (size[0], size[1], 3)
    assert arr.min() >= 0.0
    assert arr.max() <= 1.0


def assert_colour(arr, rgb, atol=0.06):
    expected = np.array(rgb, dtype=np.float32) / 255.0
    np.testing.assert_allclose(arr.reshape(-1, 3).mean(axis=0), expected, atol=atol)


# ----------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    "cls, reason",
    [
        (ImageFetchError, IMAGE_FETCH_FAILED),
        (ImageDecodeError, IMAGE_DECODE_FAILED),
        (ImageTooLargeError, IMAGE_TOO_LARGE),
    ],
)
def test_error_classes_are_data_errors_with_stable_reasons(cls, reason):
    assert issubclass(cls, ImageError)
    assert issubclass(cls, DataError)
    err = cls("boom")
    assert err.reason == reason
    assert str(err) == "boom"


def test_defaults():
    assert DEFAULT_MAX_PIXELS == 40_000_000
    assert DEFAULT_MAX_BYTES == 50 * 1024 * 1024
    assert images.DEFAULT_TIMEOUT_S == 30.0


# --------------------------------------------------------------- formats / modes


@pytest.mark.parametrize(
    "fmt, params",
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"quality": 95}),
        ("WEBP", {"lossless": True}),
    ],
)
def test_supported_formats_decode_to_rgb_float_arrays(tmp_path, fmt, params):
    path = write(tmp_path, f"img.{fmt.lower()}", encode(halves(64, 48), fmt, **params))

    img = decode_image(fetch_image_bytes(path))
    assert img.mode == "RGB"
    assert img.size == (64, 48)

    arr = load_image(path, (24, 32))
    assert_model_array(arr, (24, 32))
    # Same aspect ratio: no crop, the halves stay halves.
    assert_colour(arr[:, :12], RED)
    assert_colour(arr[:, -12:], BLUE)


def test_non_square_target_size_is_height_width(tmp_path):
    path = write(tmp_path, "img.png", encode(noise(30, 30), "PNG"))
    assert_model_array(load_image(path, (10, 20)), (10, 20))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_becomes_three_equal_channels(fmt):
    gray = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)), mode="L")
    img = decode_image(encode(gray, fmt, **({"quality": 100} if fmt == "JPEG" else {})))
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert np.array_equal(arr[..., 0], arr[..., 1])
    assert np.array_equal(arr[..., 1], arr[..., 2])


def test_sixteen_bit_grayscale_png_is_scaled_not_clipped():
    values = np.array([[0, 32896], [65535, 257 * 100]], dtype=np.uint16)
    img = decode_image(encode(Image.fromarray(values), "PNG"))
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img)[..., 0], [[0, 128], [255, 100]])


def test_bilevel_bmp():
    bilevel = Image.new("1", (8, 8), 1)
    bilevel.paste(0, (0, 0, 4, 8))
    arr = np.asarray(decode_image(encode(bilevel, "BMP")))
    assert arr[0, 0].tolist() == [0, 0, 0]
    assert arr[0, 7].tolist() == [255, 255, 255]


def test_rgba_alpha_is_composited_onto_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black -> white
    rgba.putpixel((1, 0), (255, 0, 0, 255))  # opaque red stays red
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    img = decode_image(encode(rgba, "PNG"))
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 1].tolist() == [255, 0, 0]
    assert np.all(np.abs(arr[0, 2].astype(int) - 127) <= 1)


def test_fully_transparent_image_becomes_white_model_input(tmp_path):
    path = write(tmp_path, "clear.png", encode(Image.new("RGBA", (10, 10), (0, 0, 0, 0)), "PNG"))
    arr = load_image(path, (4, 4))
    assert_model_array(arr, (4, 4))
    np.testing.assert_allclose(arr, 1.0, atol=1e-6)


def test_la_and_webp_alpha_are_composited_onto_white():
    la = Image.new("LA", (4, 4), (0, 0))
    assert np.asarray(decode_image(encode(la, "PNG"))).min() == 255

    webp = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(decode_image(encode(webp, "WEBP", lossless=True))).min() == 255


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    img = decode_image(encode(cmyk, "JPEG", quality=95))
    assert img.mode == "RGB"
    assert_colour(np.asarray(img, dtype=np.float32) / 255.0, RED)


def test_palette_png_with_transparency():
    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    pal.paste(1, (2, 0, 4, 2))  # right half index 1 = red; left half index 0
    data = encode(pal, "PNG", transparency=0)  # index 0 (black) is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    arr = np.asarray(decode_image(data))
    assert arr[0, 0].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert arr[0, 3].tolist() == [255, 0, 0]


def test_palette_png_without_transparency():
    rgb = halves(8, 8)
    data = encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG")
    arr = np.asarray(decode_image(data))
    assert arr[0, 0].tolist() == [255, 0, 0]
    assert arr[0, 7].tolist() == [0, 0, 255]


def test_gif_with_transparency():
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (254 * 3))
    pal.paste(0, (0, 0, 2, 4))
    arr = np.asarray(decode_image(encode(pal, "GIF", transparency=0)))
    assert arr[0, 0].tolist() == [255, 255, 255]
    assert arr[0, 3].tolist() == [0, 255, 0]


@pytest.mark.parametrize("fmt, params", [("GIF", {}), ("WEBP", {"lossless": True})])
def test_animated_images_use_the_first_frame(fmt, params):
    first = Image.new("RGB", (8, 8), RED)
    rest = [Image.new("RGB", (8, 8), BLUE), Image.new("RGB", (8, 8), GREEN)]
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, loop=0, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    img = decode_image(data)
    assert img.mode == "RGB"
    assert_colour(np.asarray(img, dtype=np.float32) / 255.0, RED)


def jpeg_with_orientation(img, orientation, **params):
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes(), quality=95, **params)


def test_exif_orientation_is_applied():
    # 40x20, red left / blue right. Orientation 6 = "rotate 90 degrees clockwise
    # to display": the left edge becomes the top edge.
    data = jpeg_with_orientation(halves(40, 20), 6)
    assert Image.open(io.BytesIO(data)).size == (40, 20)

    img = decode_image(data)
    assert img.size == (20, 40)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    assert_colour(arr[:16], RED)
    assert_colour(arr[-16:], BLUE)


def test_exif_orientation_survives_jpeg_draft(tmp_path):
    # Large enough that load_image's DCT-scaled decode kicks in.
    path = write(tmp_path, "rotated.jpg", jpeg_with_orientation(halves(800, 400), 6))
    arr = load_image(path, (20, 10))
    assert_model_array(arr, (20, 10))
    assert_colour(arr[:8], RED)
    assert_colour(arr[-8:], BLUE)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_malformed_exif_does_not_lose_the_image(monkeypatch):
    data = encode(halves(8, 8), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\xff garbage")
    assert decode_image(data).size == (8, 8)

    # Whatever the EXIF parser raises, the pixels are kept, unrotated.
    def broken(*args, **kwargs):
        raise SyntaxError("bad EXIF")

    monkeypatch.setattr(images.ImageOps, "exif_transpose", broken)
    img = decode_image(jpeg_with_orientation(halves(40, 20), 6))
    assert img.size == (40, 20)
    assert img.mode == "RGB"


def test_jpeg_draft_decodes_big_photos_at_reduced_scale():
    data = encode(halves(800, 600), "JPEG", quality=90)
    assert decode_image(data).size == (800, 600)
    # 600 // 50 = 12 -> largest DCT scale 1/8, keeping both sides >= 50.
    small = decode_image(data, min_size=(50, 50))
    assert small.size == (100, 75)
    assert small.mode == "RGB"
    # Non-JPEG formats ignore the hint.
    assert decode_image(encode(halves(800, 600), "PNG"), min_size=(50, 50)).size == (800, 600)


def test_one_pixel_image_is_upscaled(tmp_path):
    path = write(tmp_path, "dot.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert decode_image(fetch_image_bytes(path)).size == (1, 1)
    arr = load_image(path, (7, 5))
    assert_model_array(arr, (7, 5))
    np.testing.assert_allclose(arr, np.broadcast_to(np.array([10, 200, 30]) / 255.0, (7, 5, 3)), atol=1e-6)


# ------------------------------------------------------------------ to_model_input


def test_center_crop_of_a_wide_image_keeps_the_middle():
    wide = Image.new("RGB", (60, 20), RED)
    wide.paste(GREEN, (20, 0, 40, 20))
    wide.paste(BLUE, (40, 0, 60, 20))
    arr = to_model_input(wide, (10, 10))
    assert_model_array(arr, (10, 10))
    np.testing.assert_allclose(arr, np.broadcast_to([0.0, 1.0, 0.0], (10, 10, 3)), atol=1e-6)


def test_center_crop_of_a_tall_image_keeps_the_middle():
    tall = Image.new("RGB", (20, 60), RED)
    tall.paste(GREEN, (0, 20, 20, 40))
    arr = to_model_input(tall, (5, 5))
    np.testing.assert_allclose(arr, np.broadcast_to([0.0, 1.0, 0.0], (5, 5, 3)), atol=1e-6)


def test_to_model_input_value_range_endpoints():
    img = Image.new("RGB", (2, 1), (0, 0, 0))
    img.putpixel((1, 0), (255, 255, 255))
    arr = to_model_input(img, (1, 2))
    assert arr[0, 0].tolist() == [0.0, 0.0, 0.0]
    assert arr[0, 1].tolist() == [1.0, 1.0, 1.0]


def test_to_model_input_accepts_non_rgb_images():
    arr = to_model_input(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (2, 2))
    np.testing.assert_allclose(arr, 1.0)
    arr = to_model_input(Image.new("L", (4, 4), 0), (2, 2))
    np.testing.assert_allclose(arr, 0.0)


@pytest.mark.parametrize("size", [(0, 10), (10, -1), (10,), "ab", (2.5, 3), None])
def test_bad_size_is_a_programming_error(tmp_path, size):
    with pytest.raises(ValueError):
        to_model_input(Image.new("RGB", (4, 4)), size)
    with pytest.raises(ValueError):
        load_image(str(tmp_path / "never-read.png"), size)


# ------------------------------------------------------------------ decode errors


def test_corrupt_bytes_raise_decode_error():
    with pytest.raises(ImageDecodeError) as info:
        decode_image(b"this is not an image at all", uri="gs://bucket/x.jpg")
    assert info.value.reason == "image_decode_failed"
    assert "gs://bucket/x.jpg" in str(info.value)


def test_corrupt_file_through_load_image(tmp_path):
    path = write(tmp_path, "bad.jpg", b"\xff\xd8\xff\xe0" + b"\x00" * 100)
    with pytest.raises(ImageDecodeError) as info:
        load_image(path, (8, 8))
    assert path in str(info.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_image_raises_decode_error(fmt):
    data = encode(noise(128, 128), fmt)
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2], uri="img")
    assert info.value.reason == IMAGE_DECODE_FAILED


def test_unsupported_format_is_rejected():
    tiff = encode(Image.new("RGB", (4, 4), RED), "TIFF")
    assert Image.open(io.BytesIO(tiff)).format == "TIFF"  # Pillow could read it...
    with pytest.raises(ImageDecodeError):  # ...but it is not on our list.
        decode_image(tiff)


def test_empty_bytes_raise_decode_error():
    with pytest.raises(ImageDecodeError):
        decode_image(b"")


def test_decode_errors_are_never_raw_pillow_exceptions():
    # A bag of garbage shapes: every one must end as an ImageError.
    valid = encode(noise(32, 32), "PNG")
    candidates = [
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"GIF89a" + b"\xff" * 20,
        b"BM" + b"\x00" * 60,
        b"RIFF\x10\x00\x00\x00WEBPVP8 ",
        valid[:40],
        valid[:-20],
        valid[:60] + b"\x00" * 40 + valid[100:],
    ]
    for data in candidates:
        try:
            decode_image(data)
        except ImageError:
            pass


# ---------------------------------------------------------------- size limits


def test_huge_declared_png_fails_fast_without_allocating():
    data = png_declaring(60_000, 60_000)  # 3.6 Gpx; decoding would need ~10.8 GB
    assert len(data) < 200
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data, uri="file:///bomb.png")
    assert info.value.reason == "image_too_large"
    assert "bomb.png" in str(info.value)


def test_huge_declared_png_through_load_image(tmp_path):
    path = write(tmp_path, "bomb.png", png_declaring(60_000, 60_000))
    with pytest.raises(ImageTooLargeError):
        load_image(path, (16, 16))


def test_our_pixel_bound_is_independent_of_pillows_global():
    # 50 Mpx: over our 40 Mpx default, under Pillow's own bomb threshold, so
    # only our header check can stop it. Pillow's global must stay untouched.
    before = Image.MAX_IMAGE_PIXELS
    data = png_declaring(10_000, 5_000)
    with Image.open(io.BytesIO(data)) as probe:  # Pillow alone would accept it
        assert probe.size == (10_000, 5_000)
    with pytest.raises(ImageTooLargeError) as info:
        decode_image(data)
    assert "10000x5000" in str(info.value)
    assert Image.MAX_IMAGE_PIXELS == before


def test_max_pixels_boundary():
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=9_999)


def test_max_pixels_is_checked_before_pixels_are_decoded(monkeypatch):
    from PIL import ImageFile

    loaded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(self))
    with pytest.raises(ImageTooLargeError):
        decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=100)
    assert loaded == []


def test_max_bytes_exceeded(tmp_path):
    data = encode(noise(32, 32), "PNG")
    path = write(tmp_path, "img.png", data)
    assert fetch_image_bytes(path, max_bytes=len(data)) == data
    with pytest.raises(ImageTooLargeError) as info:
        fetch_image_bytes(path, max_bytes=len(data) - 1)
    assert info.value.reason == IMAGE_TOO_LARGE
    with pytest.raises(ImageTooLargeError):
        load_image(path, (8, 8), max_bytes=100)


# ------------------------------------------------------------------ local fetch


def test_missing_file_raises_fetch_error(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(path)
    assert info.value.reason == IMAGE_FETCH_FAILED
    assert "nope.jpg" in str(info.value)
    with pytest.raises(ImageFetchError):
        load_image(path, (8, 8))


def test_directory_raises_fetch_error(tmp_path):
    with pytest.raises(ImageFetchError):
        fetch_image_bytes(str(tmp_path))


def test_empty_file_raises_fetch_error(tmp_path):
    path = write(tmp_path, "empty.png", b"")
    with pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(path)
    assert "empty" in str(info.value)


@pytest.mark.parametrize("uri", ["", "   ", None])
def test_blank_uri_raises_fetch_error(uri):
    with pytest.raises(ImageFetchError):
        fetch_image_bytes(uri)


def test_unknown_scheme_raises_fetch_error():
    with pytest.raises(ImageFetchError):
        fetch_image_bytes("nosuchscheme://bucket/img.png")


def test_file_uri(tmp_path):
    path = write(tmp_path, "img.png", encode(halves(16, 16), "PNG"))
    uri = "file://" + path
    assert uri.startswith("file:///")
    assert fetch_image_bytes(uri) == (tmp_path / "img.png").read_bytes()
    assert_model_array(load_image(uri, (8, 8)), (8, 8))
    with pytest.raises(ImageFetchError):
        fetch_image_bytes("file://" + str(tmp_path / "missing.png"))


def test_compressed_looking_names_are_not_decompressed(tmp_path):
    data = encode(halves(16, 16), "PNG")
    path = write(tmp_path, "img.png.gz", data)
    assert fetch_image_bytes(path) == data


# ------------------------------------------------------------------------- http


class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, routes, **kwargs):
        self.routes = routes
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server API)
        if self.path == "/slow":
            self._drip()
            return
        body = self.routes.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drip(self):
        """Sends a 100-byte body one byte every 0.1 s: each read is fast, the whole is not."""
        self.send_response(200)
        self.send_header("Content-Length", "100")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client gave up, as it should
            pass

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def http_base(monkeypatch):
    """A local HTTP server on 127.0.0.1 serving `routes` (filled in by the test)."""
    # An inherited proxy setting must not capture requests to 127.0.0.1.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    routes = {}
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Handler, routes=routes)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_http_fetch(http_base):
    base, routes = http_base
    data = encode(halves(32, 16), "PNG")
    routes["/img.png"] = data
    assert fetch_image_bytes(base + "/img.png", timeout=5, allow_private_hosts=True) == data
    arr = load_image(base + "/img.png", (8, 16), allow_private_hosts=True)
    assert_model_array(arr, (8, 16))
    assert_colour(arr[:, :6], RED)
    assert_colour(arr[:, -6:], BLUE)


def test_http_404_raises_fetch_error(http_base):
    base, _ = http_base
    with pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(base + "/missing.png", timeout=5, allow_private_hosts=True)
    assert info.value.reason == IMAGE_FETCH_FAILED
    assert "404" in str(info.value)
    assert "/missing.png" in str(info.value)


def test_http_body_over_max_bytes(http_base):
    base, routes = http_base
    routes["/big"] = b"x" * 5000
    with pytest.raises(ImageTooLargeError):
        fetch_image_bytes(base + "/big", max_bytes=4999, timeout=5, allow_private_hosts=True)
    assert len(fetch_image_bytes(base + "/big", max_bytes=5000, timeout=5, allow_private_hosts=True)) == 5000


def test_http_empty_body_and_garbage(http_base):
    base, routes = http_base
    routes["/empty"] = b""
    routes["/html"] = b"<html>not found, really</html>"
    with pytest.raises(ImageFetchError):
        fetch_image_bytes(base + "/empty", timeout=5, allow_private_hosts=True)
    with pytest.raises(ImageDecodeError):
        load_image(base + "/html", (8, 8), allow_private_hosts=True)


def test_http_timeout_bounds_the_whole_body(http_base):
    base, _ = http_base
    started = time.perf_counter()
    with pytest.raises(ImageFetchError) as info:
        fetch_image_bytes(base + "/slow", timeout=0.5, allow_private_hosts=True)
    assert "timed out" in str(info.value)
    assert time.perf_counter() - started < 3.0


def test_http_connection_refused_raises_fetch_error(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    import socket

    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ImageFetchError):
        fetch_image_bytes(f"http://127.0.0.1:{port}/img.png", timeout=5, allow_private_hosts=True)


def test_decoding_leaves_pillow_globals_alone():
    from PIL import ImageFile

    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    decode_image(encode(noise(16, 16), "JPEG"))
    for bad in (png_declaring(60_000, 60_000), png_declaring(10_000, 5_000), b"junk"):
        with pytest.raises(ImageError):
            decode_image(bad)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


def test_check_image_reads_the_header_only_with_decode_images_rules():
    buf = io.BytesIO()
    Image.new("RGB", (30, 20)).save(buf, "PNG")
    data = buf.getvalue()
    assert images.check_image(data) == (30, 20)
    assert images.check_image(data[:60], max_pixels=600) == (30, 20)  # truncated pixels: the header is enough
    with pytest.raises(images.ImageTooLargeError, match="30x20 = 600 pixels, over the 599-pixel limit"):
        images.check_image(data, max_pixels=599)
    for junk in (b"", b"GIF89a not really", b"%PDF-1.4"):
        with pytest.raises(images.ImageDecodeError):
            images.check_image(junk)
