"""The paper's colour maths in plain numpy: PCA lighting, mean images, crop geometry.

Both loaders (DALI and the torch reference) and the tests take their constants from here, so the formula
is written once. Pixels are RGB on the 0-255 scale throughout; ``PixelStats`` holds the training-set mean
and the eigen-decomposition of the 3x3 RGB covariance on that scale.

PCA lighting (section 4.1) adds ``[p1 p2 p3][a1*w1, a2*w2, a3*w3]^T`` to every pixel of an image, with
``a_i ~ N(0, sigma)`` drawn once per image. The weights ``w_i`` depend on a scale convention, because the
eigenvalues are variances and the formula is not scale-free:

* ``"sqrt"`` (default): ``w_i = sqrt(l_i)`` on the 0-255 scale, as in cuda-convnet2, the paper's first
  author's own code. The offset is then in pixel units whatever scale the pixels are stored on, and with
  sigma=0.1 its standard deviation along each principal axis is a tenth of the data's own.
* ``"unit"``: the formula taken literally on pixels in [0, 1] (fb.resnet.torch): ``w_i = l_i / 255`` after
  converting back to 0-255 (``255 * (l_i / 255**2)``). On ImageNet's statistics this is about 2x weaker
  along the first axis and 15x weaker along the last than ``"sqrt"``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

LightingScale = Literal["sqrt", "unit"]
LIGHTING_SCALES: tuple[str, ...] = ("sqrt", "unit")
MEAN_MODES: tuple[str, ...] = ("pixel", "channel", "none")


def lighting_weights(eigval: np.ndarray, scale: LightingScale) -> np.ndarray:
    """The per-component magnitudes ``w_i`` that multiply ``alpha_i`` (0-255 units out)."""
    eigval = np.clip(np.asarray(eigval, dtype=np.float64), 0.0, None)
    if scale == "sqrt":
        return np.sqrt(eigval)
    if scale == "unit":
        return eigval / 255.0
    raise ValueError(f"data.lighting.scale={scale!r} is not one of {LIGHTING_SCALES}")


def lighting_matrix(eigval: np.ndarray, eigvec: np.ndarray, scale: LightingScale) -> np.ndarray:
    """``M`` with ``offset = M @ alpha``: the eigenvector columns scaled by their weights, (3, 3)."""
    return np.asarray(eigvec, dtype=np.float64) * lighting_weights(eigval, scale)[None, :]


def lighting_offset(alpha: np.ndarray, eigval: np.ndarray, eigvec: np.ndarray, scale: LightingScale) -> np.ndarray:
    """RGB offsets (..., 3), 0-255 units, for draws ``alpha`` (..., 3): ``sum_i alpha_i w_i p_i``."""
    return np.asarray(alpha, dtype=np.float64) @ lighting_matrix(eigval, eigvec, scale).T


def channel_std(cov: np.ndarray) -> np.ndarray:
    """Per-channel standard deviation (3,) from the RGB covariance."""
    return np.sqrt(np.diag(np.asarray(cov, dtype=np.float64)))


def center_offset(size: int, crop: int) -> int:
    """Top-left coordinate of the centre crop (rounded down when the margin is odd)."""
    return (size - crop) // 2


def tencrop_offsets(size: int, crop: int) -> list[tuple[int, int]]:
    """(x, y) top-left corners of the paper's five patches, in output order: centre, then the four corners.

    The ten-crop batch holds these five, then the same five mirrored horizontally.
    """
    far, mid = size - crop, center_offset(size, crop)
    return [(mid, mid), (0, 0), (far, 0), (0, far), (far, far)]


def augment_numpy(
    image: np.ndarray,
    crop_x: int,
    crop_y: int,
    crop: int,
    flip: bool,
    offset: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray | None,
    dtype: type = np.float64,
) -> np.ndarray:
    """One network input (3, crop, crop) from a stored HWC uint8 image and its drawn parameters.

    ``mean`` is the mean image (H, W, 3), a per-channel mean (3,), or zeros; it is cropped and flipped with
    the image. This is the definition both loaders are tested against (and the torch loader's transform).
    """
    window = (slice(crop_y, crop_y + crop), slice(crop_x, crop_x + crop))
    mean = np.asarray(mean, dtype=dtype)
    pixels = image[window].astype(dtype) - (mean[window] if mean.ndim == 3 else mean) + np.asarray(offset, dtype=dtype)
    if flip:
        pixels = pixels[:, ::-1]
    if std is not None:
        pixels = pixels / np.asarray(std, dtype=dtype)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def mean_patch(mean: np.ndarray, crop_x: int, crop_y: int, crop: int, flip: bool) -> np.ndarray:
    """The mean subtracted from one output, CHW: the cropped (and flipped) mean image, or (3, 1, 1)."""
    mean = np.asarray(mean, dtype=np.float64)
    if mean.ndim == 1:
        return mean[:, None, None]
    patch = mean[crop_y : crop_y + crop, crop_x : crop_x + crop]
    return np.ascontiguousarray((patch[:, ::-1] if flip else patch).transpose(2, 0, 1))
