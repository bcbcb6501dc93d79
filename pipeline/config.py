"""The `data` config group, checked once, and everything derived from it and the shard folder.

Both loaders read a ``DataSpec`` (validated settings), a ``Norm`` (the constants of the normalisation and
lighting, from ``stats.npz``) and a ``SplitPlan`` (which samples this rank reads and how many batches it
yields), so the DALI and the torch loader cannot disagree on any of them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lighting import LIGHTING_SCALES, MEAN_MODES, channel_std, lighting_matrix
from preprocess.config_values import ConfigValueError, as_bool, as_choice, as_float, as_int, as_optional_int
from preprocess.shard_format import DatasetError, PixelStats, read_meta, shard_paths

MODES = ("train", "center", "tencrop")
LOADERS = ("dali", "torch")
DEVICES = ("auto", "gpu", "cpu")
DTYPES = ("float32", "float16", "bfloat16")


def _get(cfg: Mapping, key: str, default: Any = None) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if value is None and default is not None else value


@dataclass(frozen=True)
class DataSpec:
    root: Path
    loader: str
    device: str
    batch_size: int
    crop_size: int
    random_crop: bool
    flip: bool
    lighting_sigma: float
    lighting_scale: str
    mean: str
    std: bool
    dtype: str
    threads: int | None
    shuffle_buffer: int
    prefetch: int

    @classmethod
    def from_cfg(cls, cfg: Mapping) -> DataSpec:
        """Validate a ``data`` group (dict or DictConfig), every key converted and checked
        (``preprocess.config_values``); a bad value raises a one-line ``DatasetError``."""
        root = _get(cfg, "root")
        if root in (None, "???", ""):
            raise DatasetError("data.root is not set: pass data.root=PATH (the out= folder of preprocess.build_shards)")
        lighting = cfg.get("lighting", {}) if hasattr(cfg, "get") else {}
        lighting = {"sigma": 0.0} if lighting is None else lighting  # data.lighting=null switches it off
        if not isinstance(lighting, Mapping):
            raise ConfigValueError(f"data.lighting={lighting!r} must be a group (sigma, scale) or null")
        return cls(
            root=Path(str(root)).expanduser(),
            loader=as_choice("data.loader", _get(cfg, "loader", "dali"), LOADERS),
            device=as_choice("data.device", _get(cfg, "device", "auto"), DEVICES),
            batch_size=as_int("data.batch_size", _get(cfg, "batch_size", 128), low=1),
            crop_size=as_int("data.crop_size", _get(cfg, "crop_size", 224), low=1),
            random_crop=as_bool("data.random_crop", _get(cfg, "random_crop", True)),
            flip=as_bool("data.flip", _get(cfg, "flip", True)),
            lighting_sigma=as_float("data.lighting.sigma", _get(lighting, "sigma", 0.1), low=0),
            lighting_scale=as_choice("data.lighting.scale", _get(lighting, "scale", "sqrt"), LIGHTING_SCALES),
            mean=as_choice("data.mean", _get(cfg, "mean", "pixel"), MEAN_MODES),
            std=as_bool("data.std", _get(cfg, "std", False)),
            dtype=as_choice("data.dtype", _get(cfg, "dtype", "float32"), DTYPES),
            threads=as_optional_int("data.threads", _get(cfg, "threads"), low=1),
            shuffle_buffer=as_int("data.shuffle_buffer", _get(cfg, "shuffle_buffer", 4096), low=0),
            prefetch=as_int("data.prefetch", _get(cfg, "prefetch", 2), low=1),
        )

    def threads_per_rank(self, world_size: int) -> int:
        """Explicit ``threads``, else this machine's cores shared by the ranks running on it."""
        if self.threads is not None:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) // ranks_on_this_node(world_size))


def ranks_on_this_node(world_size: int) -> int:
    """The ranks sharing this machine's cores: ``LOCAL_WORLD_SIZE`` (torchrun, train.main's own workers), else
    SLURM's ``--ntasks-per-node`` (srun starting one rank per task), else all ``world_size`` ranks."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or world_size))


@dataclass(frozen=True)
class Norm:
    """What is subtracted, divided and added, in 0-255 units: ``(x + M @ alpha - mean) / std``."""

    mean: np.ndarray  # (H, W, 3) mean image, (3,) channel mean, or (3,) zeros
    std: np.ndarray | None  # (3,) or None
    lighting: np.ndarray | None  # (3, 3) M with offset = M @ alpha, or None when lighting is off

    @classmethod
    def from_stats(cls, spec: DataSpec, stats: PixelStats, image_size: int) -> Norm:
        if spec.mean == "pixel":
            if stats.mean_image.shape != (image_size, image_size, 3):
                raise DatasetError(
                    f"stats.npz mean image is {stats.mean_image.shape}, the shards are {image_size}px: rebuild them"
                )
            mean = stats.mean_image
        else:
            mean = stats.mean if spec.mean == "channel" else np.zeros(3)
        lighting = None
        if spec.lighting_sigma > 0:
            lighting = lighting_matrix(stats.eigval, stats.eigvec, spec.lighting_scale)
        return cls(mean=mean, std=channel_std(stats.cov) if spec.std else None, lighting=lighting)


def shard_range(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Samples [start, end) of ``count`` that rank reads: contiguous, sizes differ by at most one (as DALI)."""
    return count * rank // world_size, count * (rank + 1) // world_size


@dataclass(frozen=True)
class SplitPlan:
    """Which part of a split a rank reads and how many batches one epoch yields.

    Training yields only full batches and the same number on every rank (DDP steps in lockstep):
    ``(count // world_size) // batch``; the samples of the last partial batch are left out of that epoch
    (at most ``batch`` per rank; the order is reshuffled every epoch, so they differ from epoch to epoch).
    Evaluation yields every sample of the rank's part exactly once; the last batch may be smaller.
    """

    split: str
    mode: str
    paths: tuple[Path, ...]
    shard_counts: tuple[int, ...]
    count: int
    rank: int
    world_size: int
    batch: int
    image_size: int

    @property
    def train(self) -> bool:
        return self.mode == "train"

    @property
    def rank_samples(self) -> int:
        start, end = shard_range(self.count, self.rank, self.world_size)
        return end - start

    @property
    def num_batches(self) -> int:
        if self.train:
            return (self.count // self.world_size) // self.batch
        return math.ceil(self.rank_samples / self.batch)

    @property
    def num_samples(self) -> int:
        return self.num_batches * self.batch if self.train else self.rank_samples

    def real_in_batch(self, index: int) -> int:
        """Real (unpadded) samples in batch ``index`` of the rank's epoch."""
        return max(0, min(self.batch, self.rank_samples - index * self.batch))


def plan_split(spec: DataSpec, meta: dict, split: str, mode: str, rank: int, world_size: int) -> SplitPlan:
    """Check the request against the shard folder (``meta`` as ``read_meta`` returns it, checked) and fix this rank's
    share of ``split``."""
    as_choice("mode", mode, MODES)
    if not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is outside world_size {world_size}")
    if spec.batch_size % world_size:
        raise DatasetError(
            f"data.batch_size={spec.batch_size} does not divide by world_size={world_size}: use a multiple"
        )
    paths = tuple(shard_paths(spec.root, split, meta))
    image_size = meta["settings"]["image_size"]  # an int: read_meta checked it
    if not spec.crop_size <= image_size:
        raise DatasetError(
            f"data.crop_size={spec.crop_size} does not fit the {image_size}px images of {spec.root}: "
            f"use data.crop_size={image_size} or less, or shards built with image_size={spec.crop_size} or more"
        )
    counts = tuple(int(shard["count"]) for shard in meta["splits"][split]["shards"])
    plan = SplitPlan(
        split, mode, paths, counts, sum(counts), rank, world_size, spec.batch_size // world_size, image_size
    )
    if plan.num_batches < 1:
        raise DatasetError(
            f"split {split!r} has {plan.count} samples, too few for {plan.batch} per rank: lower data.batch_size"
        )
    return plan


def load_dataset(spec: DataSpec) -> tuple[dict, PixelStats]:
    """meta.json and stats.npz of ``spec.root`` (one-line errors if missing)."""
    return read_meta(spec.root), PixelStats.load(spec.root)
