"""Exact training-set pixel statistics: per-pixel mean image, RGB mean, 3x3 covariance and its eigenvectors.

Each worker accumulates sums of uint8 pixel values in float64. Every partial sum is an integer below 2**53
(ImageNet at 256x256: at most 1.3e6 * 65536 * 255**2 = 5.5e15 < 9.0e15), so float64 adds them without rounding
and merging partials in any order gives bit-identical results whatever the number of workers.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from preprocess.shard_format import PixelStats


class PixelAccumulator:
    """Running float64 sums over (size, size, 3) uint8 RGB images."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images = 0
        self.channel_sum = np.zeros(3)
        self.outer_sum = np.zeros((3, 3))
        self.image_sum = np.zeros((size, size, 3))

    def add(self, rgb: np.ndarray) -> None:
        if rgb.shape != (self.size, self.size, 3) or rgb.dtype != np.uint8:
            raise ValueError(f"expected a ({self.size}, {self.size}, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
        self.images += 1
        # OpenCV's SIMD sums accumulate in float64: exact here, and 5-10x faster than numpy's temporaries
        self.channel_sum += cv2.sumElems(rgb)[:3]
        self.outer_sum += cv2.mulTransposed(rgb.reshape(-1, 3), True, dtype=cv2.CV_64F)
        cv2.accumulate(rgb, self.image_sum)

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
        acc.channel_sum = np.asarray(arrays["channel_sum"], dtype=np.float64)
        acc.outer_sum = np.asarray(arrays["outer_sum"], dtype=np.float64)
        acc.image_sum = np.asarray(arrays["image_sum"], dtype=np.float64)
        return acc
