"""The CPU path's last step: crop, mirror, light, subtract the mean and divide by the std, in one pass.

On a GPU, DALI's ``crop_mirror_normalize`` does this inside the graph (``pipeline.dali``). On the CPU that
operator is a scalar loop over strided uint8 reads, and a mean image needs a second float pass after it:
together a third of the pipeline's CPU time in a profile (decoding was 39%). So on the CPU the DALI graph stops
after decoding and drawing the random parameters (crop corner, flip, lighting offset: DALI's seeded,
checkpointed random operators either way), and ``normalize_crops`` (numba-compiled) writes each output
element once from the decoded image, the drawn parameters and a float32 table of the mean. That took the
pipeline from 0.55-0.66 to 0.72-0.86 of the JPEG decoding floor (best rounds; docs/pipeline.md).

Outputs go into arrays from a ``BufferPool`` that reuses an array only when nothing references it any more,
so a batch the trainer still holds is never overwritten, and the steady state touches no fresh memory
(page faults on 77 MB per batch of 128 cost as much as the arithmetic).
"""

from __future__ import annotations

import sys

import numba
import numpy as np
import torch

from pipeline.config import Norm
from pipeline.lighting import tencrop_offsets


@numba.njit(cache=True, nogil=True)
def normalize_crops(images, sources, xs, ys, flips, offsets, table, inv_std, out) -> None:  # pragma: no cover
    """``out[j] = (images[sources[j]] + offsets[j] - table)[window j] * inv_std`` as CHW, mirrored when ``flips[j]``.

    images (N, S, S, 3) uint8; sources (J,) int64; xs, ys (J,) the window's top-left corner; flips (J,);
    offsets (J, 3) float32 (0-255 units); table (3, S, S) float32, the mean image or a channel mean broadcast;
    inv_std (3,) float32; out (J, 3, crop, crop) float32. The mean is windowed and mirrored with the image.

    Written for LLVM's vectorizer: every inner loop runs forward over slices (indices that cannot be negative,
    so numba adds no wraparound test), reading the interleaved RGB row at a constant stride of 3. A mirrored
    row is computed forward into a scratch row and copied backwards. About 40 us per 224x224 output on one
    core, against 125 us for the same arithmetic indexed ``image[y, x, c]``.
    """
    crop = out.shape[2]
    width = images.shape[2]
    scratch = np.empty(crop, np.float32)
    for j in range(out.shape[0]):
        x0, y0 = int(xs[j]), int(ys[j])
        image = images[sources[j]]
        for y in range(crop):
            pixels = image[y0 + y].reshape(3 * width)[3 * x0 : 3 * (x0 + crop)]
            for c in range(3):
                mean = table[c, y0 + y, x0 : x0 + crop]
                offset, scale = offsets[j, c], inv_std[c]
                row = scratch if flips[j] else out[j, c, y]
                for x in range(crop):
                    row[x] = (np.float32(pixels[3 * x + c]) + offset - mean[x]) * scale
                if flips[j]:
                    target = out[j, c, y]
                    for x in range(crop):
                        target[x] = scratch[crop - 1 - x]


class BufferPool:
    """Arrays of one shape, handed out again only once no one else references them (a tensor made by
    ``torch.from_numpy`` holds its array for as long as the tensor or any view of it lives)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.buffers: list[np.ndarray] = []

    def take(self) -> np.ndarray:
        for index in range(len(self.buffers)):
            if sys.getrefcount(self.buffers[index]) == 2:  # the list's reference and getrefcount's argument
                return self.buffers[index]
        self.buffers.append(np.empty(self.shape, np.float32))
        return self.buffers[-1]


class CropNormalizer:
    """Network inputs from a batch of decoded images and their draws: ``(B, 3, crop, crop)``, or
    ``(B, 10, 3, crop, crop)`` for ten-crop (the patches of ``pipeline.lighting.tencrop_offsets``, then mirrored)."""

    def __init__(self, norm: Norm, image_size: int, crop: int, batch: int, tencrop: bool) -> None:
        mean = norm.mean if norm.mean.ndim == 3 else np.broadcast_to(norm.mean, (image_size, image_size, 3))
        self.table = np.ascontiguousarray(mean.transpose(2, 0, 1), dtype=np.float32)
        std = norm.std if norm.std is not None else np.ones(3)
        self.inv_std = (1.0 / std).astype(np.float32)
        self.batch, self.crop = batch, crop
        self.patches = None  # ten-crop: the fixed (xs, ys, flips, offsets) of every output, the same each batch
        self.per_image = 1
        if tencrop:
            xs, ys, flips = zip(*[(x, y, m) for m in (0, 1) for x, y in tencrop_offsets(image_size, crop)], strict=True)
            self.per_image = len(xs)
            columns = tuple(np.tile(np.array(column), batch) for column in (xs, ys, flips))
            self.patches = (*columns, np.zeros((batch * self.per_image, 3), np.float32))
        self.sources = np.repeat(np.arange(batch), self.per_image)  # the image of each output
        self.pool = BufferPool((batch * self.per_image, 3, crop, crop))

    def __call__(self, images: np.ndarray, crop_x=None, crop_y=None, flip=None, offset=None) -> torch.Tensor:
        """``images`` (B, S, S, 3) uint8 and the B corners, flips and offsets (none for ten-crop)."""
        if len(images) != self.batch:
            raise ValueError(f"expected a batch of {self.batch} images, got {len(images)}")
        draws = self.patches or (crop_x, crop_y, flip, np.asarray(offset, np.float32))
        out = self.pool.take()
        normalize_crops(images, self.sources, *draws, self.table, self.inv_std, out)
        batch = torch.from_numpy(out)
        return batch if self.patches is None else batch.view(self.batch, self.per_image, 3, self.crop, self.crop)
