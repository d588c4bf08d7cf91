"""Every bad image the data layer must survive gets its stated reason; good odd images are normalized."""

import io
import struct
import zlib

import pytest
from PIL import Image

from casseat_ray.config import ImageConfig
from casseat_ray.images import CheckedImage, ImageReject, check_image
from tests.conftest import shared_data


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but carries (almost) no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


GOOD = encode(Image.new("RGB", (120, 90), (10, 200, 30)))


@pytest.mark.parametrize(
    "data, reason",
    [
        (None, "missing_image"),
        (b"", "empty_image"),
        (b"this is a text file named .jpg\n", "not_an_image"),
        (encode(Image.new("RGB", (200, 200), (1, 2, 3)), "JPEG")[:300], "corrupt_image"),
        (png_header_only(20000, 20000), "image_too_large"),
        (png_header_only(9000, 9000), "image_too_large"),  # under PIL's own bomb limit, over ours
        (encode(Image.new("RGB", (1, 300))), "image_too_small"),
        (encode(Image.new("RGB", (40, 3000))), "extreme_aspect_ratio"),
    ],
)
def test_bad_images_are_rejected_with_reason(data, reason):
    result = check_image(data, ImageConfig())
    assert isinstance(result, ImageReject), result
    assert result.reason == reason and result.detail


@pytest.mark.parametrize(
    "img, fmt",
    [
        (Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG"),
        (Image.new("P", (64, 48), 3), "PNG"),
        (Image.new("RGBA", (64, 48), (255, 0, 0, 0)), "PNG"),
        (Image.new("I;16", (64, 48), 40000), "PNG"),
        (Image.new("L", (64, 48), 128), "PNG"),
    ],
)
def test_odd_modes_are_normalized_to_rgb(img, fmt):
    result = check_image(encode(img, fmt))
    assert isinstance(result, CheckedImage)
    out = Image.open(io.BytesIO(result.data))
    assert out.mode == "RGB" and out.size == (64, 48) == (result.width, result.height)
    if img.mode == "RGBA":  # fully transparent red composited on white
        assert out.getpixel((5, 5)) == (255, 255, 255)
    if img.mode == "I;16":  # 16-bit scaled by depth (40000 / 257), not clipped to white
        assert out.getpixel((5, 5)) == (156, 156, 156) and result.format == "PNG"


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    result = check_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert (result.width, result.height) == (40, 80)


def test_downscaled_to_pixel_budget_keeping_aspect():
    result = check_image(encode(Image.new("RGB", (1000, 500))), ImageConfig(max_pixels=50_000))
    assert result.width * result.height <= 50_000
    assert abs(result.width / result.height - 2.0) < 0.02
    assert check_image(GOOD).width == 120  # small images keep their size


def test_real_math_v_images_are_accepted():
    folder = shared_data("math-v", "images")
    files = sorted(folder.glob("*.jpg"))
    assert len(files) == 304
    results = [check_image(f.read_bytes()) for f in files]
    rejects = [(f.name, r.reason) for f, r in zip(files, results) if isinstance(r, ImageReject)]
    assert rejects == []
