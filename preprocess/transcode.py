"""One image in, one training image out: bytes -> RGB -> shorter side to ``size`` -> centre crop -> JPEG.

Decisions, so that every image of ImageNet gives a usable, deterministic result:

- The header is read first (Pillow, no pixel decoding) to learn the real format, colour mode and size;
  an image with more than ``max_pixels`` pixels is rejected there, never decoded (decompression bombs).
- RGB and greyscale JPEGs, the common case, are decoded by OpenCV (libjpeg-turbo, the fastest path here).
  A JPEG must end with its EOI marker after the last scan: libjpeg would silently fill a truncated file with
  grey, so truncated files are rejected instead.
- Everything else (CMYK/YCCK JPEGs, with Adobe's inverted CMYK handled by Pillow, PNG or GIF named .JPEG,
  palette, 16-bit) goes through Pillow and ``convert("RGB")``; 16-bit greyscale keeps its 8 high bits (Pillow
  would clip it); transparent pixels (an alpha channel or a transparent colour) are composited onto white, as an
  image viewer shows them.
- EXIF orientation is ignored: pixels are used as stored, as Pillow-based pipelines (torchvision) see them.
- When the shorter side is at least twice ``size``, the JPEG decoder downscales in the DCT domain by 2, 4 or 8
  (keeping the shorter side >= ``size``); the rest of the way uses area interpolation (shrinking) or bicubic
  (enlarging), applied to the central square only (see ``resize_center_crop``), so a 1000:1 strip costs
  no more than a square image.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from preprocess.area import area_shrink

DEFAULT_MAX_PIXELS = 100_000_000
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's modes of 16-bit greyscale PNG/TIFF
JPEG_SOS, JPEG_EOI = b"\xff\xda", b"\xff\xd9"


class UnusableImage(ValueError):
    """The input cannot become a training image; the message is the reason recorded in rejected.jsonl."""


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open the header only (no pixel decoding), rejecting empty, unknown and oversized inputs.

    ``max_pixels`` is the only size limit: Pillow's own (``Image.MAX_IMAGE_PIXELS``, 179M) is lifted while
    the header is read, so a larger ``max_pixels`` works.
    """
    if not data:
        raise UnusableImage("empty file")
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnusableImage("not an image (format not recognised)") from None  # Pillow's message has an address
    except (OSError, SyntaxError, ValueError) as err:
        raise UnusableImage(f"not an image ({err})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    width, height = image.size
    if width < 1 or height < 1:
        raise UnusableImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise UnusableImage(f"decompression bomb: {width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    return image


def reduction_factor(width: int, height: int, size: int) -> int:
    """The DCT-domain downscale (1, 2, 4 or 8) that keeps the shorter side >= ``size``."""
    return next(k for k in (8, 4, 2, 1) if k == 1 or min(width, height) >= k * size)


def is_truncated_jpeg(data: bytes) -> bool:
    """True when the last scan (SOS marker) is not followed by an end-of-image marker.

    Searches for a scan only after the last EOI (near the end of a whole file), not through the whole file.
    """
    eoi = data.rfind(JPEG_EOI)
    return data.find(JPEG_SOS, eoi + 1) != -1 if eoi >= 0 else JPEG_SOS in data


# OpenCV's IMREAD_REDUCED_GRAYSCALE_k constants are the bare DCT-scaling bits; IMREAD_COLOR_RGB makes libjpeg
# write RGB directly (no conversion pass) and IMREAD_IGNORE_ORIENTATION skips EXIF rotation
_REDUCTION_FLAGS = {
    1: 0,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_RGB_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION


def _decode_with_opencv(data: bytes, reduction: int) -> np.ndarray:
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), _RGB_FLAGS | _REDUCTION_FLAGS[reduction])
    if rgb is None:
        raise UnusableImage("JPEG data could not be decoded")
    return rgb


def _decode_with_pillow(image: Image.Image, reduction: int) -> np.ndarray:
    if image.format == "JPEG" and reduction > 1:
        image.draft(image.mode, (image.width // reduction, image.height // reduction))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise UnusableImage(f"corrupt or truncated image ({err})") from None
    if image.mode in SIXTEEN_BIT_GREY:  # convert("RGB") would clip at 255: keep the 8 high bits instead
        image = Image.fromarray((np.asarray(image).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    elif image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # alpha, or a transparent colour
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.asarray(image.convert("RGB"))


def decode_rgb(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode any image file to an (H, W, 3) uint8 RGB array, DCT-downscaled as far as ``size`` allows."""
    image = probe(data, max_pixels)
    reduction = reduction_factor(image.width, image.height, size)
    if image.format == "JPEG":
        if is_truncated_jpeg(data):
            raise UnusableImage("truncated JPEG (no end-of-image marker after the last scan)")
        if image.mode in ("RGB", "L"):
            return _decode_with_opencv(data, reduction)
    return _decode_with_pillow(image, reduction)


def resize_center_crop(rgb: np.ndarray, size: int) -> np.ndarray:
    """The central size x size patch of the image rescaled so its shorter side is ``size``.

    Computed as the rescaled central square (side = the shorter side): the same pixels as rescaling the whole
    image and then cropping (area interpolation only looks inside each output pixel's footprint), without
    resizing the parts that the crop throws away. Area interpolation when shrinking (``preprocess.area``),
    bicubic when enlarging.
    """
    height, width = rgb.shape[:2]
    short = min(height, width)
    if short > size:
        return area_shrink(rgb, size)
    top, left = (height - short) // 2, (width - short) // 2
    square = rgb[top : top + short, left : left + short]
    if short == size:
        return np.ascontiguousarray(square)
    return cv2.resize(square, (size, size), interpolation=cv2.INTER_CUBIC)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """Baseline JPEG (libjpeg-turbo via OpenCV, 4:2:0 chroma), deterministic for the same pixels."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return encoded.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode one of our own output JPEGs to RGB (the pixels readers will see)."""
    rgb = cv2.imdecode(np.frombuffer(data, np.uint8), _RGB_FLAGS)
    if rgb is None:
        raise UnusableImage("encoded JPEG does not decode")
    return rgb


def transcode(data: bytes, size: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Source file bytes -> the size x size JPEG stored in a shard. Raises ``UnusableImage`` with the reason."""
    return encode_jpeg(resize_center_crop(decode_rgb(data, size, max_pixels), size), quality)
