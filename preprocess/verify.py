"""Check a shard folder against its meta.json: every shard, index, sample, label and image.

    python -m preprocess.verify out=/data/shards [workers=N]

Exits 0 and prints one OK line, exits 1 with one line per problem found, or exits 2 with one line when out= is not
a shard folder at all.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from preprocess.cli import EXIT_BAD_INPUT, run_cli
from preprocess.config_values import as_optional_int
from preprocess.shard_format import (
    CLASS_EXT,
    IMAGE_EXT,
    INDEX_VERSION,
    LABEL_EXT,
    SAMPLE_EXTS,
    STATS_FILE,
    DatasetError,
    PixelStats,
    index_path,
    read_meta,
)
from preprocess.stats import PixelAccumulator


def _check_index(path: Path, members: Sequence[tarfile.TarInfo], count: int) -> list[str]:
    """The .idx must list every sample's components at their real data offsets and sizes, in tar order."""
    idx = index_path(path)
    if not idx.is_file():
        return [f"{idx}: missing index file"]
    lines = idx.read_text().splitlines()
    if not lines or lines[0] != f"{INDEX_VERSION} {count}":
        return [f"{idx}: header {lines[0] if lines else ''!r}, expected {INDEX_VERSION!r} and {count} samples"]
    listed = [
        tuple(fields[i : i + 4]) for line in lines[1:] for fields in [line.split()] for i in range(0, len(fields), 4)
    ]
    actual = [(m.name.partition(".")[2], str(m.offset_data), str(m.size), m.name) for m in members]
    return [] if listed == actual else [f"{idx}: offsets or sizes differ from the tar's members; rebuild the shard"]


def check_shard(
    path: Path, expected: dict, image_size: int, num_classes: int, stats: PixelAccumulator | None = None
) -> tuple[list[str], list[str]]:
    """(problems, keys) of one shard checked against its meta.json entry; its images are added to ``stats``."""
    if not path.is_file():
        return [f"{path}: missing"], []
    problems = []
    data = path.read_bytes()
    if len(data) != expected["bytes"]:
        problems.append(f"{path}: {len(data)} bytes, meta.json says {expected['bytes']}")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        problems.append(f"{path}: sha256 differs from meta.json (modified or corrupt)")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            members = [member for member in tar if member.isfile()]
            for member in members:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as err:
        return [*problems, f"{path}: unreadable tar ({err})"], []
    if len(samples) != expected["count"]:
        problems.append(f"{path}: {len(samples)} samples, meta.json says {expected['count']}")
    problems += _check_index(path, members, len(samples))
    for key, parts in samples.items():
        where = f"{path}:{key}"
        if sorted(parts) != sorted(SAMPLE_EXTS):
            problems.append(f"{where}: components {sorted(parts)}, expected {sorted(SAMPLE_EXTS)}")
            continue
        label = int(np.frombuffer(parts[LABEL_EXT], "<i4")[0]) if len(parts[LABEL_EXT]) == 4 else None
        if label is None or parts[CLASS_EXT] != str(label).encode() or not 0 <= label < num_classes:
            problems.append(f"{where}: label cls={parts[CLASS_EXT]!r} lbl={label} not one valid index < {num_classes}")
        image = cv2.imdecode(np.frombuffer(parts[IMAGE_EXT], np.uint8), cv2.IMREAD_UNCHANGED)
        if image is None or image.shape != (image_size, image_size, 3):
            shape = None if image is None else image.shape
            problems.append(f"{where}: image decodes to {shape}, expected {(image_size, image_size, 3)}")
        elif stats is not None:
            stats.add(np.ascontiguousarray(image[..., ::-1]))  # OpenCV's BGR: the RGB pixels build_shards summed
    return problems, list(samples)


def _check_shard_job(job: tuple) -> tuple[list[str], list[str], dict | None]:
    """check_shard in a worker process; a training shard's pixel sums come back for the statistics check."""
    path, expected, image_size, num_classes = job
    stats = PixelAccumulator(image_size) if path.parent.name == "train" else None
    problems, keys = check_shard(path, expected, image_size, num_classes, stats)
    return problems, keys, stats.to_arrays() if stats is not None else None


def _check_stats(root: Path, image_size: int, train_count: int, recomputed: PixelStats | None) -> list[str]:
    try:
        stats = PixelStats.load(root)
    except DatasetError as err:
        return [str(err)]
    problems = []
    if recomputed is not None and stats.mean_image.shape == recomputed.mean_image.shape:
        # equal up to what another build of the JPEG decoder could change (a rare pixel off by one); another
        # dataset's statistics, or those of other JPEG settings, differ by far more
        tolerance = {"mean_image": 0.01, "mean": 0.01, "cov": 1e-4, "eigval": 1e-4, "eigvec": 1e-4}
        differ = [
            name
            for name, atol in tolerance.items()
            if not np.allclose(getattr(stats, name), getattr(recomputed, name), rtol=1e-4, atol=atol)
        ]
        if differ:
            problems.append(
                f"{root / STATS_FILE}: {', '.join(differ)} differ from the statistics of the training shards' "
                "images (another dataset's, or a changed shard): re-run build_shards"
            )
    if stats.mean_image.shape != (image_size, image_size, 3):
        problems.append(
            f"{root / STATS_FILE}: mean_image shape {stats.mean_image.shape}, expected {(image_size, image_size, 3)}"
        )
    if stats.pixels != train_count * image_size * image_size:
        problems.append(f"{root / STATS_FILE}: {stats.pixels} pixels, expected {train_count} training images' worth")
    if not np.all(np.diff(stats.eigval) <= 0) or not np.allclose(stats.cov @ stats.eigvec, stats.eigvec * stats.eigval):
        problems.append(f"{root / STATS_FILE}: eigval/eigvec are not the descending eigen-decomposition of cov")
    return problems


def _map(function: Callable, jobs: Sequence, workers: int) -> Iterator:
    if workers <= 1:
        yield from map(function, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        yield from pool.map(function, jobs)


def verify(root: str | Path, workers: int = 1, show_progress: bool = False) -> list[str]:
    """Every problem found in the shard folder ``root``, as readable lines; empty when all is well.
    ``DatasetError`` when ``root`` is not a shard folder at all (no readable meta.json)."""
    root = Path(root)
    meta = read_meta(root)  # no shard folder there: DatasetError, bad input rather than a problem found
    image_size, num_classes = meta["settings"]["image_size"], len(meta["classes"])
    jobs = [
        (root / split / shard["name"], shard, image_size, num_classes)
        for split, info in meta["splits"].items()
        for shard in info["shards"]
    ]
    checked = _map(_check_shard_job, jobs, workers)
    problems: list[str] = []
    keys_by_split: dict[str, list[str]] = {split: [] for split in meta["splits"]}
    sums = PixelAccumulator(image_size)  # merged as the shards come: one shard's sums in memory, not all
    progress = tqdm(checked, total=len(jobs), unit="shard", disable=not show_progress, dynamic_ncols=True)
    for job, (shard_problems, shard_keys, arrays) in zip(jobs, progress, strict=True):
        problems += shard_problems
        keys_by_split[job[0].parent.name] += shard_keys
        if arrays is not None:
            sums.merge(PixelAccumulator.from_arrays(arrays))
    for split, info in meta["splits"].items():
        keys = keys_by_split[split]
        if len(set(keys)) != len(keys):
            problems.append(f"split {split}: {len(keys) - len(set(keys))} sample keys appear more than once")
        if sum(shard["count"] for shard in info["shards"]) != info["count"]:
            problems.append(f"split {split}: shard counts do not add up to its count {info['count']}")
    if "train" in meta["splits"]:
        recomputed = sums.finalize() if sums.images else None
        problems += _check_stats(root, image_size, meta["splits"]["train"]["count"], recomputed)
    return problems


@hydra.main(config_path="../conf", config_name="verify", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if not cfg.out:
        print("error: out= is required: the folder written by preprocess.build_shards", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        workers = as_optional_int("workers", cfg.workers, low=1) or len(os.sched_getaffinity(0))
        problems = verify(cfg.out, workers, show_progress=True)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    if problems:
        print(f"{cfg.out}: {len(problems)} problem(s):", *problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    meta = read_meta(cfg.out)
    shards = sum(len(info["shards"]) for info in meta["splits"].values())
    counts = ", ".join(f"{split} {info['count']}" for split, info in meta["splits"].items())
    print(f"{cfg.out}: OK ({shards} shards, {counts} samples, all decode to {meta['settings']['image_size']}px)")


if __name__ == "__main__":
    run_cli(main, path_keys=("out",))
