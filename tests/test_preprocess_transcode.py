"""Per-image transcoding and the pixel statistics, checked against independent numpy computations."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from preprocess.stats import PixelAccumulator, add_pixel_sums
from preprocess.transcode import (
    UnusableImage,
    decode_jpeg,
    decode_rgb,
    encode_jpeg,
    is_truncated_jpeg,
    probe,
    reduction_factor,
    resize_center_crop,
    transcode,
)


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like RGB image: a smooth colour field (JPEG-friendly) plus mild noise."""
    rng = np.random.default_rng(seed)
    field = cv2.resize(
        rng.uniform(0, 255, (3, 3, 3)).astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR
    )
    return np.clip(field + rng.normal(0, 1, field.shape), 0, 255).astype(np.uint8)


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def jpeg_bytes(rgb: np.ndarray, quality: int = 95) -> bytes:
    return pil_bytes(Image.fromarray(rgb), "JPEG", quality=quality)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def test_rgb_jpeg_decodes_to_its_pixels():
    rgb = smooth_image(40, 60)
    decoded = decode_rgb(jpeg_bytes(rgb, quality=100), size=40)
    assert decoded.shape == (40, 60, 3) and decoded.dtype == np.uint8
    assert mean_abs_diff(decoded, rgb) < 1.5


def test_adobe_cmyk_jpeg_converts_to_the_right_colours():
    rgb = smooth_image(32, 32, seed=1)
    # the textbook conversion: K = min(C, M, Y) with C = 255 - R ..., CMY rescaled by 255 / (255 - K)
    cmy = 255 - rgb.astype(np.float64)
    k = cmy.min(axis=2, keepdims=True)
    cmy = (cmy - k) * 255 / np.maximum(255 - k, 1)
    cmyk = np.concatenate([cmy, k], axis=2).round().astype(np.uint8)
    data = pil_bytes(Image.frombytes("CMYK", (32, 32), cmyk.tobytes()), "JPEG", quality=100)
    assert b"Adobe" in data[:100]  # libjpeg writes Adobe's APP14 marker, and inverted CMYK, like Photoshop
    decoded = decode_rgb(data, size=32)
    assert decoded.shape == (32, 32, 3)
    assert mean_abs_diff(decoded, rgb) < 2.0  # an uninverted reading would be off by ~100


def test_greyscale_png_named_jpeg_rgba_and_palette_inputs():
    grey = smooth_image(30, 20)[..., 0]
    decoded = decode_rgb(jpeg_bytes(grey, quality=100), size=20)
    assert decoded.shape == (30, 20, 3)
    assert np.array_equal(decoded[..., 0], decoded[..., 1]) and np.array_equal(decoded[..., 1], decoded[..., 2])
    assert mean_abs_diff(decoded[..., 0], grey) < 1.5

    rgb = smooth_image(24, 36, seed=2)
    assert np.array_equal(decode_rgb(pil_bytes(Image.fromarray(rgb), "PNG"), size=24), rgb)  # PNG bytes, any name

    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0  # fully transparent stripe: composited onto white
    decoded = decode_rgb(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), size=24)
    assert np.all(decoded[:, :10] == 255) and np.array_equal(decoded[:, 10:], rgb[:, 10:])

    palette = Image.fromarray(rgb).quantize(16)
    assert np.array_equal(decode_rgb(pil_bytes(palette, "GIF"), size=24), np.asarray(palette.convert("RGB")))


def test_sixteen_bit_greyscale_keeps_its_high_bits_and_a_transparent_colour_becomes_white():
    grey16 = np.array([[0, 255, 32768, 65535]], np.uint16)
    decoded = decode_rgb(pil_bytes(Image.fromarray(grey16), "PNG"), size=1)
    assert np.array_equal(decoded[..., 0], [[0, 0, 128, 255]]) and np.array_equal(decoded[..., 0], decoded[..., 2])

    rgb = smooth_image(8, 8, seed=5)
    rgb[0, 0] = (1, 2, 3)
    for image, key in ((Image.fromarray(rgb), (1, 2, 3)), (Image.fromarray(rgb[..., 0]), 1)):
        decoded = decode_rgb(pil_bytes(image, "PNG", transparency=key), size=8)  # PNG's tRNS colour key
        assert np.array_equal(decoded[0, 0], [255, 255, 255]) and np.array_equal(
            decoded[4, 4], np.asarray(image.convert("RGB"))[4, 4]
        )


def test_exif_orientation_is_ignored():
    rgb = smooth_image(20, 50)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = pil_bytes(Image.fromarray(rgb), "JPEG", quality=100, exif=exif.tobytes())
    assert decode_rgb(data, size=20).shape == (20, 50, 3)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"class folders hold JPEGs, not notes\n" * 3, "not an image"),
        (jpeg_bytes(smooth_image(64, 64))[:-400], "truncated"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_unusable_inputs_are_rejected_with_a_reason(data, reason):
    with pytest.raises(UnusableImage, match=reason) as caught:
        transcode(data, size=32, quality=90)
    assert " at 0x" not in str(caught.value)  # no object address: rejected.jsonl is the same from run to run


def png_claiming_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header then claims width x height (a decompression bomb's header)."""
    data = bytearray(pil_bytes(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = bytes(data[12:16]) + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def test_truncation_means_a_scan_without_an_end_of_image_after_it():
    whole = jpeg_bytes(smooth_image(32, 32))
    assert not is_truncated_jpeg(whole) and not is_truncated_jpeg(whole + b"\x00" * 10)  # trailing padding is fine
    assert is_truncated_jpeg(whole[:-300])  # no EOI at all
    assert is_truncated_jpeg(whole + whole[:-300])  # a second image cut short after a complete first one
    assert not is_truncated_jpeg(b"GIF89a no markers")


def test_decompression_bomb_is_rejected_from_its_header():
    with pytest.raises(UnusableImage, match="decompression bomb"):
        transcode(png_claiming_size(60_000, 60_000), size=32, quality=90)
    assert probe(png_claiming_size(20_000, 10_000), max_pixels=400_000_000).size == (20_000, 10_000)  # > Pillow's limit
    with pytest.raises(UnusableImage, match="max_pixels=1000"):
        transcode(jpeg_bytes(smooth_image(40, 40)), size=32, quality=90, max_pixels=1000)


def test_reduction_factor_keeps_the_shorter_side_at_least_the_target():
    assert reduction_factor(500, 375, 256) == 1
    assert reduction_factor(1024, 512, 256) == 2
    assert reduction_factor(1100, 1030, 256) == 4
    assert reduction_factor(4000, 3000, 256) == 8
    assert reduction_factor(300, 2100, 256) == 1


def test_dct_downscaled_decode_matches_a_full_decode_and_area_resize():
    rgb = smooth_image(520, 640, seed=3)
    data = jpeg_bytes(rgb)
    reduced = decode_rgb(data, size=64)
    assert reduced.shape == (65, 80, 3)  # decoded at 1/8 in the DCT domain
    expected = cv2.resize(rgb, (80, 65), interpolation=cv2.INTER_AREA)
    assert mean_abs_diff(reduced, expected) < 2.0
    assert mean_abs_diff(transcode_to_rgb(data, 64), resize_center_crop(rgb, 64)) < 2.0


def transcode_to_rgb(data: bytes, size: int) -> np.ndarray:
    return decode_jpeg(transcode(data, size=size, quality=95))


def test_area_shrink_by_two_is_the_two_by_two_block_mean_then_centre_crop():
    rgb = np.random.default_rng(4).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    blocks = rgb.reshape(4, 2, 6, 2, 3).astype(np.float64).mean(axis=(1, 3))  # 4x6 after halving
    out = resize_center_crop(rgb, 4)
    assert out.shape == (4, 4, 3)
    assert np.abs(out - blocks[:, 1:5]).max() <= 0.5 + 1e-9


def coverage_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) area weights from the definition: the overlap of [k, k+1) with [i s, (i+1) s), over s."""
    scale = src / dst
    lo, hi = np.arange(dst)[:, None] * scale, np.arange(1, dst + 1)[:, None] * scale
    k = np.arange(src)[None, :]
    return np.clip(np.minimum(hi, k + 1) - np.maximum(lo, k), 0.0, None) / scale


@pytest.mark.parametrize(("height", "width", "size"), [(375, 500, 256), (23, 17, 7), (40, 300, 39)])
def test_area_shrink_is_the_mean_over_each_output_pixels_footprint(height: int, width: int, size: int):
    rgb = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = rgb[top : top + side, left : left + side].astype(np.float64)
    weights = coverage_matrix(side, size)
    exact = np.stack([weights @ square[:, :, c] @ weights.T for c in range(3)], axis=-1)
    out = resize_center_crop(rgb, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    assert np.abs(out - exact).max() <= 0.5 + 1e-3  # the exact area mean, rounded
    opencv = cv2.resize(np.ascontiguousarray(square.astype(np.uint8)), (size, size), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - opencv).max() <= 1


def test_area_shrink_memory_does_not_grow_with_the_number_of_source_sizes():
    rng = np.random.default_rng(4)
    resize_center_crop(rng.integers(0, 256, (640, 640, 3), dtype=np.uint8), 256)  # the largest intermediates
    tracemalloc.start()
    try:
        for side in range(257, 640, 9):  # ImageNet's sources come in hundreds of sizes
            resize_center_crop(rng.integers(0, 256, (side, side + 3, 3), dtype=np.uint8), 256)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000  # one set of float intermediates per size would keep ~90 MB here


def test_pixel_sums_are_exact_integer_sums_over_long_rows():
    images = np.random.default_rng(3).integers(0, 256, (2, 3, 600, 3), dtype=np.uint8)  # rows in 256-px chunks
    channel_sum, outer_sum = np.zeros(3, np.int64), np.zeros((3, 3), np.int64)
    image_sum = np.zeros((3, 600, 3), np.int64)
    for rgb in images:
        add_pixel_sums(rgb, channel_sum, outer_sum, image_sum)
    pixels = images.reshape(-1, 3).astype(np.int64)
    assert np.array_equal(channel_sum, pixels.sum(axis=0))
    assert np.array_equal(outer_sum, pixels.T @ pixels)
    assert np.array_equal(image_sum, images.astype(np.int64).sum(axis=0))


def test_upscaling_keeps_a_linear_ramp_linear():
    ramp = np.tile((10 + 20 * np.arange(12, dtype=np.float64))[None, :, None], (8, 1, 3)).astype(np.uint8)  # 8x12
    out = resize_center_crop(ramp, 32)  # the central 8x8 (source columns 2..9) enlarged 4x
    assert out.shape == (32, 32, 3)
    source_x = 2 + (np.arange(32) + 0.5) / 4 - 0.5  # where each output column samples the source
    interior = slice(8, 24)  # bicubic reproduces a linear function away from the replicated border
    np.testing.assert_allclose(out[16, interior, 0], 10 + 20 * source_x[interior], atol=1.0)


def test_extreme_aspect_ratios_keep_the_central_square():
    strip = np.zeros((10, 1000, 3), np.uint8)
    strip[:, 495:505] = 255  # the central 10x10 square is white, everything else black
    assert np.all(resize_center_crop(strip, 20) == 255)
    assert np.all(resize_center_crop(np.ascontiguousarray(strip.transpose(1, 0, 2)), 5) == 255)
    assert decode_jpeg(transcode(jpeg_bytes(strip), size=20, quality=90)).mean() > 240


def test_encoding_is_deterministic_and_close_to_the_pixels():
    rgb = smooth_image(32, 32, seed=6)
    assert encode_jpeg(rgb, 95) == encode_jpeg(rgb.copy(), 95)
    error95 = mean_abs_diff(decode_jpeg(encode_jpeg(rgb, 95)), rgb)
    assert error95 < 2.5
    assert mean_abs_diff(decode_jpeg(encode_jpeg(rgb, 30)), rgb) > error95
    assert len(encode_jpeg(rgb, 30)) < len(encode_jpeg(rgb, 95))


def numpy_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    pixels = images.reshape(-1, 3).astype(np.float64)
    return {
        "mean_image": images.astype(np.float64).mean(axis=0),
        "mean": pixels.mean(axis=0),
        "cov": np.cov(pixels.T, bias=True),
    }


def test_accumulated_statistics_equal_numpy_and_merge_exactly():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (9, 6, 6, 3), dtype=np.uint8)
    images[..., 1] = images[..., 0] // 2 + images[..., 1] // 2  # correlated channels: a full covariance
    whole, first, second = PixelAccumulator(6), PixelAccumulator(6), PixelAccumulator(6)
    for i, image in enumerate(images):
        whole.add(image)
        (first if i < 4 else second).add(image)
    first.merge(PixelAccumulator.from_arrays(second.to_arrays()))
    assert all(
        np.array_equal(a, b) for a, b in zip(first.to_arrays().values(), whole.to_arrays().values(), strict=True)
    )

    stats, expected = whole.finalize(), numpy_stats(images)
    np.testing.assert_allclose(stats.mean_image, expected["mean_image"], rtol=1e-12)
    np.testing.assert_allclose(stats.mean, expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(stats.cov, expected["cov"], rtol=1e-9)
    assert stats.pixels == 9 * 36
    assert np.all(np.diff(stats.eigval) < 0)
    np.testing.assert_allclose(stats.cov @ stats.eigvec, stats.eigvec * stats.eigval, atol=1e-8)
    np.testing.assert_allclose(stats.eigvec.T @ stats.eigvec, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.sort(stats.eigval), np.linalg.eigvalsh(expected["cov"]), rtol=1e-9)


def test_accumulator_rejects_images_of_another_size():
    with pytest.raises(ValueError, match="uint8"):
        PixelAccumulator(4).add(np.zeros((5, 5, 3), np.uint8))
