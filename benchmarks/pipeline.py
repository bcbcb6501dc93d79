"""Images/s of the training input pipeline on the CPU, and the floor it cannot beat.

    python benchmarks/pipeline.py data.root=PATH loader=dali    # the DALI training pipeline
    python benchmarks/pipeline.py data.root=PATH loader=torch   # the webdataset + DataLoader reference
    python benchmarks/pipeline.py data.root=PATH loader=floor   # libjpeg-turbo decoding alone, same JPEGs

All three use ``threads`` CPU threads (DALI threads, DataLoader worker processes, decoding threads). Each
times ``rounds`` runs of ``batches`` batches; ``images_per_sec`` is the best round (the least disturbed by
other work on a shared machine), ``median_images_per_sec`` the median. The last line printed is JSON.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

# The scripts here are named like the packages they measure: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from pipeline.loader import build_loader  # noqa: E402
from preprocess.cli import EXIT_BAD_INPUT  # noqa: E402
from preprocess.shard_format import DatasetError, read_meta, shard_paths  # noqa: E402


def loader_batches(data: dict, threads: int) -> tuple[Iterator[int], int]:
    """Batch sizes from the training loader, endlessly (epoch after epoch)."""
    loader = build_loader({**data, "threads": threads}, "train", "train")
    batches = (int(images.shape[0]) for _ in itertools.count() for images, _ in loader)
    return batches, loader.plan.batch


def floor_batches(data: dict, threads: int, batch: int, needed: int) -> tuple[Iterator[int], int]:
    """Batch sizes of plain ``cv2.imdecode`` over the same training JPEGs, ``threads`` at a time."""
    root = Path(data["root"])
    jpegs = []
    for path in shard_paths(root, "train", read_meta(root)):
        jpegs += [sample["jpg"] for sample in tarfile_samples([{"url": str(path)}])]
        if len(jpegs) >= needed:
            break
    cv2.setNumThreads(1)
    pool = ThreadPoolExecutor(threads)

    def decode(jpeg: bytes) -> int:
        return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape[0]

    def batches() -> Iterator[int]:
        for start in itertools.cycle(range(0, len(jpegs) - batch + 1, batch)):
            yield len(list(pool.map(decode, jpegs[start : start + batch])))

    return batches(), batch


def time_rounds(batches: Iterator[int], batch: int, timed: int, rounds: int, desc: str) -> list[float]:
    """Images/s of ``rounds`` successive runs of ``timed`` batches each."""
    rates = []
    with tqdm(total=rounds * timed * batch, unit="img", desc=desc) as bar:
        for _ in range(rounds):
            images, start = 0, time.perf_counter()
            for _ in range(timed):
                size = next(batches)
                images += size
                bar.update(size)
            rates.append(images / (time.perf_counter() - start))
    return rates


def run(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    threads, warmup, timed, rounds = int(cfg.threads), int(cfg.warmup), int(cfg.batches), int(cfg.rounds)
    if cfg.loader == "floor":
        size = int(data["batch_size"])
        batches, batch = floor_batches(data, threads, size, (warmup + timed) * size)
    elif cfg.loader in ("dali", "torch"):
        batches, batch = loader_batches({**data, "loader": cfg.loader}, threads)
    else:
        raise DatasetError(f"loader={cfg.loader!r} is not one of dali|torch|floor")
    for _ in range(warmup):
        next(batches)
    rates = time_rounds(batches, batch, timed, rounds, f"{cfg.loader} x{threads}")
    return {
        "loader": str(cfg.loader),
        "threads": threads,
        "batch": batch,
        "images": timed * batch * rounds,
        "rounds": [round(rate, 1) for rate in rates],
        "median_images_per_sec": round(float(np.median(rates)), 1),
        "images_per_sec": round(max(rates), 1),
    }


@hydra.main(version_base="1.3", config_path="../conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(
        f"{result['loader']}: {result['images_per_sec']} images/s on {result['threads']} threads "
        f"(best of {len(result['rounds'])} rounds; median {result['median_images_per_sec']})"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
