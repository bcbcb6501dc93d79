"""How fast is build_shards? Compared with a naive Pillow loop and with the codec floor, on ImageNet-like JPEGs.

    python benchmarks/preprocess.py [--images 2000] [--workers N] [--image-size 256]

Writes --images synthetic photographs (500x375 and 375x500, 1/f "natural" spectrum, JPEG quality 90, about the
size of an average ImageNet file) into a temporary ImageFolder tree, then times on the same files:

  build_shards   the real thing: workers processes, shards, index files, exact statistics
  naive          one process: Pillow open -> resize (shorter side) -> centre crop -> save JPEG -> tar
  floor          decode + encode alone, the same codec calls as build_shards (libjpeg-turbo, DCT scaling
                 included), on the same workers: no resizing, no statistics, no tar

and prints images/s, images/s per core and the ratios (targets: >= 3x naive on 2 cores, <= 1.3x the floor),
plus a single-core breakdown of build_shards' per-image work.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.build_shards import build_shards  # noqa: E402
from preprocess.stats import PixelAccumulator  # noqa: E402
from preprocess.transcode import decode_jpeg, decode_rgb, encode_jpeg, resize_center_crop  # noqa: E402


def natural_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Sum of upsampled noise octaves (amplitude ~ 1/frequency): JPEG sizes close to real photographs."""
    image = np.zeros((height, width, 3), np.float32)
    for octave in range(1, 9):
        cells = 2**octave
        noise = rng.normal(0, 1, (cells * height // width + 1, cells + 1, 3)).astype(np.float32)
        image += cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC) * (70 / octave**0.7)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image + 120, 0, 255).astype(np.uint8)


def write_image(args: tuple[Path, int, int]) -> Path:
    """Synthetic photograph ``index`` (its own seed: the same files whatever the number of processes)."""
    root, index, classes = args
    height, width = (375, 500) if index % 4 else (500, 375)
    path = root / "train" / f"n{index % classes:08d}" / f"n{index % classes:08d}_{index}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = natural_image(np.random.default_rng([0, index]), height, width)
    path.write_bytes(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return path


def write_images(root: Path, count: int, workers: int, classes: int = 10) -> list[Path]:
    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(write_image, [(root, index, classes) for index in range(count)], chunksize=32)


def naive_loop(paths: list[Path], out: Path, size: int, quality: int) -> None:
    with tarfile.open(out, "w") as tar:
        for path in paths:
            image = Image.open(path).convert("RGB")
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
            left, top = (image.width - size) // 2, (image.height - size) // 2
            buffer = io.BytesIO()
            image.crop((left, top, left + size, top + size)).save(buffer, "JPEG", quality=quality)
            info = tarfile.TarInfo(f"{path.stem}.jpg")
            info.size = buffer.tell()
            buffer.seek(0)
            tar.addfile(info, buffer)


def floor_one(args: tuple[str, int, int]) -> int:
    """Decode (with the same DCT downscaling) and encode a size x size image: the codec work alone."""
    path, size, quality = args
    rgb = decode_rgb(Path(path).read_bytes(), size)
    return len(encode_jpeg(np.ascontiguousarray(rgb[:size, :size]), quality))


def _init_floor_worker() -> None:
    cv2.setNumThreads(1)


def floor(paths: list[Path], workers: int, size: int, quality: int) -> None:
    with mp.get_context("spawn").Pool(workers, initializer=_init_floor_worker) as pool:
        pool.map(floor_one, [(str(p), size, quality) for p in paths], chunksize=16)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (pool workers are joined when done)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(function) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call: CPU time stays meaningful on a machine shared with others."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    function()
    return time.perf_counter() - wall, cpu_seconds() - cpu


def warm_page_cache(paths: list[Path]) -> None:
    """Read every file once, so each contender starts with the same files in memory (some VMs, this project's
    benchmark machine among them, drop the page cache within seconds; reads during a run can still be slow)."""
    for path in paths:
        path.read_bytes()


def stage_breakdown(paths: list[Path], size: int, quality: int) -> dict[str, float]:
    """Milliseconds per image of each step of build_shards' per-image work, one core."""
    cv2.setNumThreads(1)
    totals = dict.fromkeys(("read", "decode", "resize+crop", "encode", "stats decode", "stats add"), 0.0)
    stats = PixelAccumulator(size)
    stats.add(decode_jpeg(encode_jpeg(resize_center_crop(decode_rgb(paths[0].read_bytes(), size), size), quality)))
    for path in paths:  # after one untimed image: numba loads its compiled kernels on first use
        marks = [time.perf_counter()]
        data = path.read_bytes()
        marks.append(time.perf_counter())
        rgb = decode_rgb(data, size)
        marks.append(time.perf_counter())
        crop = resize_center_crop(rgb, size)
        marks.append(time.perf_counter())
        jpeg = encode_jpeg(crop, quality)
        marks.append(time.perf_counter())
        decoded = decode_jpeg(jpeg)
        marks.append(time.perf_counter())
        stats.add(decoded)
        marks.append(time.perf_counter())
        for name, start, end in zip(totals, marks, marks[1:], strict=False):
            totals[name] += end - start
    return {name: 1000 * value / len(paths) for name, value in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="number of synthetic JPEGs (default 2000)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes (all cores)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--quality", type=int, default=95)
    args = parser.parse_args()
    size, quality, workers = args.image_size, args.quality, args.workers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_images(tmp / "src", args.images, workers)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        print(f"{len(paths)} JPEGs, 500x375 / 375x500, quality 90, mean {mean_kb:.0f} KB; {workers} workers")
        contenders = {
            "build_shards": lambda: build_shards(
                tmp / "src",
                tmp / "shards",
                image_size=size,
                quality=quality,
                workers=workers,
                splits=["train"],
                shard_size=100,
                show_progress=False,
            ),
            "naive": lambda: naive_loop(paths, tmp / "naive.tar", size, quality),
            "floor": lambda: floor(paths, workers, size, quality),
        }
        seconds = {}
        for name, run in contenders.items():
            warm_page_cache(paths)
            seconds[name] = timed(run)
        warm_page_cache(paths)
        breakdown = stage_breakdown(paths[:200], size, quality)

    n = len(paths)
    cores = {"build_shards": workers, "naive": 1, "floor": workers}
    print("\n| method | processes | images/s (wall) | images/s per core (wall) | images per CPU-second |")
    print("| --- | --- | --- | --- | --- |")
    for name, (wall, cpu) in seconds.items():
        print(f"| {name} | {cores[name]} | {n / wall:.0f} | {n / wall / cores[name]:.0f} | {n / cpu:.0f} |")
    (ours_wall, ours_cpu), (naive_wall, naive_cpu), (floor_wall, floor_cpu) = seconds.values()
    print(f"\nbuild_shards vs naive loop, wall clock:  {naive_wall / ours_wall:.2f}x faster (target >= 3x on 2 cores)")
    print(f"  same, from CPU time on {workers} cores:    {workers * naive_cpu / ours_cpu:.2f}x")
    print(f"build_shards vs floor, wall clock:       {ours_wall / floor_wall:.2f}x the floor's time (target <= 1.3x)")
    print(f"  same, from CPU time:                   {ours_cpu / floor_cpu:.2f}x")
    print("\nper image, one core (ms): " + ", ".join(f"{name} {ms:.2f}" for name, ms in breakdown.items()))
    print(
        f"total {sum(breakdown.values()):.2f} ms (build_shards also spends time in start-up, planning and tar writing)"
    )
    codec, ours_ms = breakdown["decode"] + breakdown["encode"], 1000 * ours_cpu / n
    print(f"build_shards' CPU time per image, {ours_ms:.2f} ms, is {ours_ms / codec:.2f}x the codec work alone above")


if __name__ == "__main__":
    main()
