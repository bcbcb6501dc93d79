"""Area interpolation for shrinking the central square of an RGB image: each output pixel is the mean of the source
area it covers.

Output pixel ``i`` of an axis shrunk from ``src`` to ``dst`` pixels covers source ``[i s, (i + 1) s)``,
``s = src / dst``; source pixel ``k`` contributes with weight ``overlap([k, k + 1), [i s, (i + 1) s)) / s``.
The same definition as OpenCV's ``INTER_AREA`` (outputs agree within 1), computed 2.1x faster (0.32 against
0.68 ms for 375 -> 256 px): OpenCV's generic non-integer path is scalar, here both passes are vectorized loops
over whole rows (numba):

1. vertical: ``rows(i) = sum_t w[i, t] * image[start[i] + t]``, over rows of ``src * 3`` values, in float32;
2. transpose (OpenCV), so the horizontal pass also runs over contiguous rows;
3. horizontal, the same loop;
4. round to uint8 and transpose back (OpenCV).
"""

from __future__ import annotations

import functools
import math
import threading

import cv2
import numba
import numpy as np


@functools.lru_cache(maxsize=64)
def area_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """``(start, weights)``: output ``i`` is ``sum_t weights[i, t] * source[start[i] + t]`` (``src > dst``)."""
    scale = src / dst
    taps = int(np.ceil(scale)) + 1
    start = np.floor(np.arange(dst) * scale).astype(np.int64)
    lo, hi = np.arange(dst)[:, None] * scale, (np.arange(dst)[:, None] + 1) * scale
    pixel = start[:, None] + np.arange(taps)[None, :]
    overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    overlap[pixel >= src] = 0.0
    return start, (overlap / scale).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _weighted_rows(source, row0, col0, start, weights, out) -> None:  # pragma: no cover
    """``out[i] = sum_t weights[i, t] * source[row0 + start[i] + t, col0 : col0 + out.shape[1]]`` (2-D arrays)."""
    width = out.shape[1]
    for i in range(out.shape[0]):
        row = out[i]
        row[:] = 0.0
        for t in range(weights.shape[1]):
            weight = weights[i, t]
            if weight != 0.0:
                src = source[row0 + start[i] + t][col0 : col0 + width]
                for x in range(width):
                    row[x] += weight * np.float32(src[x])


_scratch = threading.local()  # per thread: one float32 buffer per intermediate, reused from image to image


def _buffers(side: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three float32 intermediates as views of per-thread buffers, grown to the largest image seen: fresh
    3 MB per image cost page faults that took more time than the arithmetic. One buffer each, not one per
    shape: ImageNet's sources come in hundreds of sizes."""
    shapes = ((size, side, 3), (side, size, 3), (size, size, 3))
    buffers = _scratch.__dict__.setdefault("buffers", [np.empty(0, np.float32) for _ in shapes])
    views = []
    for i, shape in enumerate(shapes):
        needed = math.prod(shape)
        if buffers[i].size < needed:
            buffers[i] = np.empty(needed, np.float32)
        views.append(buffers[i][:needed].reshape(shape))
    return tuple(views)


def area_shrink(image: np.ndarray, size: int) -> np.ndarray:
    """The central square of an (H, W, 3) uint8 image, side ``min(H, W) > size``, shrunk to (size, size, 3) uint8."""
    height, width = image.shape[:2]
    side = min(height, width)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or side <= size:
        raise ValueError(f"area_shrink needs a uint8 RGB image larger than {size}, got {image.shape} {image.dtype}")
    top, left = (height - side) // 2, (width - side) // 2
    start, weights = area_weights(side, size)
    vertical, turned, horizontal = _buffers(side, size)
    rows = np.ascontiguousarray(image).reshape(height, width * 3)
    _weighted_rows(rows, top, 3 * left, start, weights, vertical.reshape(size, side * 3))
    cv2.transpose(vertical, turned)
    _weighted_rows(turned.reshape(side, size * 3), 0, 0, start, weights, horizontal.reshape(size, size * 3))
    return cv2.transpose(cv2.convertScaleAbs(horizontal))  # rounds to nearest (ties to even), saturating
