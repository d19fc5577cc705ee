"""Image preprocessing: decode, orient, flatten to RGB and downscale for the OCR model.

The model takes OpenCV's BGR channel order, uint8, [H, W, 3]. Sizes are checked
from the header before a single pixel is decoded, so a small file claiming a
huge canvas costs nothing.
"""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.media import IMAGE_TYPES, sniff

# Pillow names of the formats we decode; restricting Image.open to them keeps
# every other (less exercised) decoder away from untrusted bytes.
FORMATS = ("JPEG", "PNG", "WEBP")
_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image a quarter
_WHITE = (255, 255, 255, 255)
# What broken files raise from Pillow's decoders, besides the OSError of a truncated one.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def _flatten_to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, with any transparency composited on white (what a viewer would show)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit greyscale: scale to 8 bits; convert("L") would clip everything above 255 to white.
        grey = np.clip(np.asarray(img, dtype=np.float32) / 257.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(grey, "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size with the longest side at most ``max_side``, aspect kept."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    ratio = max_side / longest
    return max(1, round(width * ratio)), max(1, round(height * ratio))


class ImagePreprocessor:
    """Thread-safe: holds only its limits, so ``prepare`` may run in an executor."""

    def __init__(self, max_pixels: int = 40_000_000, max_side: int = 960, min_side: int = 8) -> None:
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.min_side = min_side

    def prepare(self, data: bytes) -> tuple[np.ndarray, dict[str, float], tuple[float, float]]:
        """BGR uint8 [H, W, 3], input statistics, and (sx, sy) mapping output pixels back to the original.

        The original is the image as displayed, i.e. after its EXIF orientation.
        """
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as exc:
            raise self._too_large() from exc
        except UnidentifiedImageError as exc:
            media_type = sniff(data)
            if media_type is not None and media_type.startswith("image/") and media_type not in IMAGE_TYPES:
                raise InvalidArgument(f"image is {media_type}; supported: JPEG, PNG, WebP") from exc
            raise InvalidArgument("image could not be decoded: not a JPEG, PNG or WebP file") from exc
        except _DECODE_ERRORS as exc:
            raise InvalidArgument(f"image could not be decoded: {exc}") from exc
        with img:
            return self._prepare(img, len(data))

    def _too_large(self, width: int = 0, height: int = 0) -> ResourceExhausted:
        size = f" is {width}x{height} ({width * height / 1e6:.1f} megapixels)" if width else " is too large"
        return ResourceExhausted(f"image{size}; the limit is {self.max_pixels / 1e6:g} megapixels")

    def _prepare(self, img: Image.Image, n_bytes: int) -> tuple[np.ndarray, dict[str, float], tuple[float, float]]:
        stored_w, stored_h = img.size
        if stored_w * stored_h > self.max_pixels:
            raise self._too_large(stored_w, stored_h)
        try:
            orientation = img.getexif().get(_ORIENTATION, 1)
        except _DECODE_ERRORS:
            orientation = 1  # unreadable EXIF: show the pixels as stored
        width, height = (stored_h, stored_w) if orientation in _SWAPS_AXES else (stored_w, stored_h)
        if min(width, height) < self.min_side:
            raise InvalidArgument(f"image is {width}x{height} pixels; each side must be at least {self.min_side}")
        target = _fit(width, height, self.max_side)
        if img.format == "JPEG" and target != (width, height):
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below the target): far less work for photos.
            stored_target = (target[1], target[0]) if orientation in _SWAPS_AXES else target
            img.draft("RGB", stored_target)
        try:
            img.load()  # truncated files fail here, since LOAD_TRUNCATED_IMAGES stays off
            oriented = ImageOps.exif_transpose(img) if orientation != 1 else img
            rgb = _flatten_to_rgb(oriented)
        except Image.DecompressionBombError as exc:
            raise self._too_large(stored_w, stored_h) from exc
        except _DECODE_ERRORS as exc:
            raise InvalidArgument(f"image could not be decoded: {exc}") from exc
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
        luma = np.asarray(rgb.convert("L"), dtype=np.float64) / 255.0
        bgr = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)[:, :, ::-1])
        stats = {
            "image_width": float(width),
            "image_height": float(height),
            "image_megapixels": width * height / 1e6,
            "image_brightness": float(luma.mean()),
            "image_contrast": float(luma.std()),
            "image_resized": float(target != (width, height)),
            "image_bytes": float(n_bytes),
        }
        return bgr, stats, (width / target[0], height / target[1])
