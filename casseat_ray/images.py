"""Image validation and normalization, before any model sees an image.

``check_image(data, cfg)`` takes encoded bytes (or ``None``) and returns either a
normalized image (RGB, EXIF orientation applied, downscaled to the pixel budget, re-encoded)
or a reject reason. Dimensions are read from the header before any pixel is decoded, so a
decompression bomb is refused without allocating it.

Reasons: missing_image, empty_image, not_an_image, image_too_large, image_too_small,
extreme_aspect_ratio, corrupt_image.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from casseat_ray.config import ImageConfig


KEEP_FORMATS = ("JPEG", "PNG")  # what every vision processor decodes; others are re-encoded


@dataclass
class CheckedImage:
    data: bytes
    format: str
    width: int
    height: int


@dataclass
class ImageReject:
    reason: str
    detail: str


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: 16-bit scaled by bit depth, floats from [0, 1], alpha on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255:
            arr = arr / 257.0  # 65535 -> 255, the depth's own scale (no contrast stretch)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype("uint8"), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")


def check_image(data: bytes | None, cfg: ImageConfig | None = None) -> CheckedImage | ImageReject:
    cfg = cfg or ImageConfig()
    if data is None:
        return ImageReject("missing_image", "no image in the row")
    if len(data) == 0:
        return ImageReject("empty_image", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return ImageReject("image_too_large", str(e))
    except UnidentifiedImageError:
        return ImageReject("not_an_image", f"{len(data)} bytes that no image decoder recognises")
    except Exception as e:  # a header so broken that PIL fails while reading it
        return ImageReject("corrupt_image", f"{type(e).__name__}: {e}")
    w, h = img.size
    if w * h > cfg.max_header_pixels:
        return ImageReject("image_too_large", f"{w}x{h} = {w * h} pixels > {cfg.max_header_pixels}")
    if min(w, h) < cfg.min_side:
        return ImageReject("image_too_small", f"{w}x{h}, shorter side < {cfg.min_side}")
    if max(w, h) / min(w, h) > cfg.max_aspect_ratio:
        return ImageReject("extreme_aspect_ratio", f"{w}x{h}, ratio {max(w, h) / min(w, h):.1f} > {cfg.max_aspect_ratio}")
    source_format = img.format
    try:
        img.load()  # the full decode: truncated files fail here
        rotated = img.getexif().get(0x0112, 1) not in (0, 1)  # EXIF orientation tag
        rgb = _to_rgb(ImageOps.exif_transpose(img) if rotated else img)
    except Exception as e:
        return ImageReject("corrupt_image", f"{type(e).__name__}: {e}")
    if rgb.width * rgb.height > cfg.max_pixels:
        scale = (cfg.max_pixels / (rgb.width * rgb.height)) ** 0.5
        rgb = rgb.resize((max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale))), Image.Resampling.BICUBIC)
    elif not rotated and img.mode == "RGB" and source_format in KEEP_FORMATS:
        # Nothing to change: keep the original bytes (re-encoding costs more than the checks).
        return CheckedImage(data, source_format, w, h)
    fmt = cfg.format if cfg.format != "auto" else ("JPEG" if source_format == "JPEG" else "PNG")
    out = io.BytesIO()
    rgb.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"compress_level": 1}))
    return CheckedImage(out.getvalue(), fmt, rgb.width, rgb.height)
