"""The reference loader: webdataset + torch DataLoader + OpenCV/numpy, with the DALI loader's semantics.

Same parts (rank r reads samples [N r / W, N (r+1) / W) of the concatenated tars; in training DALI moves a rank
to the next part every epoch, this loader does not), same batch counts,
same kind of shuffle (the tar order is permuted per epoch with a seed shared by the ranks, then samples
pass a shuffle buffer), same augmentation formula (``pipeline.lighting.augment_numpy``). The draws differ
from DALI's (another RNG), so the two agree in distribution, and pixel for pixel given the same draws.

Every random choice is a pure function of (seed, epoch, rank, position), so resuming needs only the epoch
and the batch index: the skipped batches are streamed past without being decoded.

DataLoader worker ``w`` of ``n`` streams the rank's part and builds the batches ``i`` with
``(i - start) % n == w`` (``start``: the first batch of a resumed epoch); the DataLoader returns them
round-robin, i.e. in order. Each worker reads the rank's bytes (cheap, page cache) but decodes only its own
batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from pipeline.config import DataSpec, Norm, SplitPlan, shard_range
from pipeline.lighting import augment_numpy, center_offset, tencrop_offsets
from preprocess.shard_format import IMAGE_EXT, LABEL_EXT, DatasetError

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tar_order(num_tars: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order the tars are read in this epoch: the same permutation on every rank."""
    return np.random.default_rng([seed, epoch]).permutation(num_tars) if shuffle else np.arange(num_tars)


def shuffle_buffer(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """A seeded reservoir shuffle: keep ``size`` items, emit a random one for each new arrival."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = int(rng.integers(len(buffer)))
        yield buffer[slot]
        buffer[slot] = item
    yield from (buffer[i] for i in rng.permutation(len(buffer)))


def draw_params(
    spec: DataSpec, plan: SplitPlan, seed: int, epoch: int, position: int
) -> tuple[int, int, bool, np.ndarray]:
    """crop_x, crop_y, flip, alpha for the sample at ``position`` of this rank's epoch."""
    rng = np.random.default_rng([seed, epoch, plan.rank, position])
    margin = plan.image_size - spec.crop_size
    augment = plan.train
    if augment and spec.random_crop:
        x, y = (int(v) for v in rng.integers(0, margin + 1, size=2))
    else:
        x = y = center_offset(plan.image_size, spec.crop_size)
    flip = bool(augment and spec.flip and rng.random() < 0.5)
    alpha = rng.normal(0.0, spec.lighting_sigma, size=3) if augment and spec.lighting_sigma > 0 else np.zeros(3)
    return x, y, flip, alpha


def decode(jpeg: bytes) -> np.ndarray:
    """RGB uint8 HWC from JPEG bytes (libjpeg-turbo through OpenCV)."""
    image = cv2.imdecode(np.frombuffer(jpeg, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError("a JPEG in the shards does not decode: rebuild the shards with preprocess.build_shards")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ShardStream(IterableDataset):
    """One epoch of one rank as batches ``{"images", "labels", "keys", "crop_x", ...}`` from batch ``start``."""

    def __init__(self, spec: DataSpec, plan: SplitPlan, norm: Norm, seed: int) -> None:
        self.spec, self.plan, self.norm, self.seed = spec, plan, norm, seed
        self.epoch = 0
        self.start = 0

    def _samples(self) -> Iterator[tuple[str, bytes, int]]:
        """(key, jpeg, label) of this rank's contiguous part of the (permuted) concatenation, shuffled if training."""
        plan = self.plan
        lo, hi = shard_range(plan.count, plan.rank, plan.world_size)
        order = tar_order(len(plan.paths), self.seed, self.epoch, plan.train)

        def stream():
            position = 0
            for tar in order:
                count = plan.shard_counts[tar]
                if position + count > lo and position < hi:
                    for sample in tarfile_samples([{"url": str(plan.paths[tar])}]):
                        if lo <= position < hi:
                            yield sample["__key__"], sample[IMAGE_EXT], int(np.frombuffer(sample[LABEL_EXT], "<i4")[0])
                        position += 1
                else:
                    position += count

        if not plan.train:
            return stream()
        rng = np.random.default_rng([self.seed, self.epoch, plan.rank, 2**31])
        return shuffle_buffer(stream(), max(1, self.spec.shuffle_buffer), rng)  # 0 = no shuffle, as DALI's initial_fill

    def _tencrop(self, image: np.ndarray) -> np.ndarray:
        """(10, 3, crop, crop): the five patches, then the same five mirrored."""
        crop, norm = self.spec.crop_size, self.norm
        patches = [(x, y, m) for m in (False, True) for x, y in tencrop_offsets(self.plan.image_size, crop)]
        return np.stack(
            [augment_numpy(image, x, y, crop, m, np.zeros(3), norm.mean, norm.std, np.float32) for x, y, m in patches]
        )

    def _batch(self, index: int, samples: list[tuple[str, bytes, int]]) -> dict:
        """Decode and augment batch ``index`` of the epoch; training batches also carry their draws."""
        spec, plan, norm = self.spec, self.plan, self.norm
        images, draws = [], []
        for i, (_key, jpeg, _label) in enumerate(samples):
            image = decode(jpeg)
            if image.shape != (plan.image_size, plan.image_size, 3):
                raise DatasetError(f"an image in {spec.root} is {image.shape}, not {plan.image_size}px: rebuild")
            if plan.mode == "tencrop":
                images.append(self._tencrop(image))
                continue
            x, y, flip, alpha = draw_params(spec, plan, self.seed, self.epoch, index * plan.batch + i)
            offset = norm.lighting @ alpha if norm.lighting is not None else np.zeros(3)
            images.append(augment_numpy(image, x, y, spec.crop_size, flip, offset, norm.mean, norm.std, np.float32))
            draws.append((x, y, flip, alpha, offset))
        batch = {
            "images": torch.from_numpy(np.stack(images)).to(TORCH_DTYPES[spec.dtype]),
            "labels": torch.tensor([label for _, _, label in samples], dtype=torch.int64),
            "keys": [key for key, _, _ in samples],
        }
        if draws:
            columns = zip(*draws, strict=True)
            names = ("crop_x", "crop_y", "flip", "alpha", "offset")
            batch.update({name: np.asarray(column) for name, column in zip(names, columns, strict=True)})
        return batch

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers, me = (worker.num_workers, worker.id) if worker else (1, 0)
        plan, batch, index = self.plan, [], 0

        def mine(i: int) -> bool:
            return i >= self.start and (i - self.start) % workers == me

        for sample in self._samples():
            if index >= plan.num_batches:
                return
            batch.append(sample if mine(index) else None)  # other workers' samples are only counted
            if len(batch) == plan.batch:
                if mine(index):
                    yield self._batch(index, batch)
                batch, index = [], index + 1
        if batch and index < plan.num_batches and mine(index):
            yield self._batch(index, batch)


class TorchBackend:
    """Runs ``ShardStream`` in DataLoader workers; stateless apart from (epoch, batch) kept by the Loader."""

    name = "torch"

    def __init__(
        self, spec: DataSpec, plan: SplitPlan, norm: Norm, *, seed: int, threads: int, pin_memory: bool
    ) -> None:
        self.stream = ShardStream(spec, plan, norm, seed)
        self.threads, self.prefetch, self.pin_memory = threads, spec.prefetch, pin_memory

    def epoch(self, epoch: int, start: int) -> Iterator[dict]:
        self.stream.epoch, self.stream.start = epoch, start
        workers = 0 if self.threads <= 1 else self.threads
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.prefetch if workers else None,
            pin_memory=self.pin_memory,
            # starting an epoch draws the workers' base seed; from the global generator, that draw would shift
            # the trainer's dropout masks after a resume (the stream seeds itself from seed and epoch)
            generator=torch.Generator().manual_seed(epoch),
        )
        yield from loader

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
