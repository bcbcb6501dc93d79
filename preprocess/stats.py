"""Exact training-set pixel statistics: per-pixel mean image, RGB mean, 3x3 covariance and its eigenvectors.

Each worker accumulates exact integer sums of uint8 pixel values in int64, in one pass over each image: channel
sums, sums of channel products, and the per-pixel image sum. Integers add exactly in any order, so merging partials
gives bit-identical results whatever the number of workers (ImageNet at 256x256 reaches at most
1.3e6 * 65536 * 255**2 = 5.5e15, far below int64's 9.2e18).
"""

from __future__ import annotations

from collections.abc import Mapping

import numba
import numpy as np

from preprocess.shard_format import PixelStats


@numba.njit(cache=True, nogil=True)
def add_pixel_sums(rgb, channel_sum, outer_sum, image_sum) -> None:  # pragma: no cover
    """Add an (H, W, 3) uint8 image to int64 sums: per channel ``channel_sum`` (3,), of channel products
    ``outer_sum`` (3, 3), and per pixel ``image_sum`` (H, W, 3).

    Exact integer arithmetic: a row of at most 256 pixels sums products below 2**24 in int32 (vectorized by
    LLVM), rows are added in int64. 8x faster than ``cv2.mulTransposed`` at 256 px, which was a tenth of the
    preprocessing time per image; the image sum is added in the same pass, while the row is in cache (twice as
    fast as ``cv2.accumulate`` into float64). Rows longer than 256 pixels are summed in chunks of 256.
    """
    height, width = rgb.shape[0], rgb.shape[1]
    for y in range(height):
        row = rgb[y].reshape(3 * width)
        row_sum = image_sum[y].reshape(3 * width)
        for i in range(3 * width):
            row_sum[i] += row[i]
        for chunk in range(0, width, 256):
            pixels = row[3 * chunk : 3 * min(chunk + 256, width)]
            s0 = s1 = s2 = p00 = p01 = p02 = p11 = p12 = p22 = np.int32(0)
            for x in range(pixels.shape[0] // 3):
                r, g, b = np.int32(pixels[3 * x]), np.int32(pixels[3 * x + 1]), np.int32(pixels[3 * x + 2])
                s0 += r
                s1 += g
                s2 += b
                p00 += r * r
                p01 += r * g
                p02 += r * b
                p11 += g * g
                p12 += g * b
                p22 += b * b
            channel_sum[0] += s0
            channel_sum[1] += s1
            channel_sum[2] += s2
            outer_sum[0, 0] += p00
            outer_sum[1, 1] += p11
            outer_sum[2, 2] += p22
            outer_sum[0, 1] += p01
            outer_sum[1, 0] += p01
            outer_sum[0, 2] += p02
            outer_sum[2, 0] += p02
            outer_sum[1, 2] += p12
            outer_sum[2, 1] += p12


class PixelAccumulator:
    """Running exact sums over (size, size, 3) uint8 RGB images (see the module docstring)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images = 0
        self.channel_sum = np.zeros(3, np.int64)
        self.outer_sum = np.zeros((3, 3), np.int64)
        self.image_sum = np.zeros((size, size, 3), np.int64)

    def add(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.size, self.size, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a ({self.size}, {self.size}, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
        self.images += 1
        add_pixel_sums(np.ascontiguousarray(rgb), self.channel_sum, self.outer_sum, self.image_sum)

    def merge(self, other: PixelAccumulator) -> None:
        if other.size != self.size:
            raise ValueError(f"cannot merge statistics of {other.size}px images into {self.size}px ones")
        self.images += other.images
        self.channel_sum += other.channel_sum
        self.outer_sum += other.outer_sum
        self.image_sum += other.image_sum

    @property
    def pixels(self) -> int:
        return self.images * self.size * self.size

    def finalize(self) -> PixelStats:
        """Mean image, mean, population covariance and its eigen-decomposition (descending, signs fixed)."""
        if self.images == 0:
            raise ValueError("no training images were accumulated: cannot compute pixel statistics")
        mean = self.channel_sum / self.pixels
        cov = self.outer_sum / self.pixels - np.outer(mean, mean)
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        eigval, eigvec = eigval[order], eigvec[:, order]
        # an eigenvector's sign is arbitrary: make each column's largest-magnitude entry positive, for reproducibility
        signs = np.sign(eigvec[np.abs(eigvec).argmax(axis=0), np.arange(3)])
        return PixelStats(
            mean_image=self.image_sum / self.images,
            mean=mean,
            cov=cov,
            eigval=eigval,
            eigvec=eigvec * signs,
            pixels=self.pixels,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The raw sums as arrays (for ``np.savez``), so a later merge can combine them exactly.

        The image sum is stored as uint32 when it fits (always, for one shard): half the bytes, still exact.
        """
        fits = self.image_sum.max(initial=0) < 2**32
        return {
            "size": np.array(self.size),
            "images": np.array(self.images),
            "channel_sum": self.channel_sum,
            "outer_sum": self.outer_sum,
            "image_sum": self.image_sum.astype(np.uint32) if fits else self.image_sum,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> PixelAccumulator:
        acc = cls(int(arrays["size"]))
        acc.images = int(arrays["images"])
        acc.channel_sum = np.asarray(arrays["channel_sum"]).astype(np.int64)
        acc.outer_sum = np.asarray(arrays["outer_sum"]).astype(np.int64)
        acc.image_sum = np.asarray(arrays["image_sum"]).astype(np.int64)
        return acc
