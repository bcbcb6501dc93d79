"""``build_loader``: the trainer's one entry point to the data, DALI or the torch reference, CPU or GPU.

    loader = build_loader(cfg.data, "train", "train", rank=rank, world_size=world, seed=cfg.seed, device=device)
    for epoch in range(epochs):
        for images, labels in loader:      # one epoch per iter(), reshuffled
            ...
        checkpoint["loader"] = loader.state_dict()

Epochs and positions are counted here; a backend only produces the batches of epoch ``e`` from batch ``k``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch

from pipeline.config import DataSpec, Norm, SplitPlan, load_dataset, plan_split
from pipeline.torch_loader import TORCH_DTYPES, TorchBackend
from preprocess.shard_format import DatasetError


class Backend(Protocol):
    name: str  # part of a loader state's identity: a state restores only into a backend of the same name

    def epoch(self, epoch: int, start: int) -> Iterator[dict]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


class DaliBackend:
    """Drives a DALI pipeline one reader epoch per loader epoch; state = DALI checkpoint + runs in the epoch.

    Each reader epoch of this rank is ``reader_batches`` runs, padded at the end. The loader's epoch takes
    the first ``plan.num_batches`` of them, trimmed to the real samples; the remaining runs (the padded tail,
    or in training the partial batch) are run and dropped before the next epoch starts. On a GPU the graph
    normalizes and ``MeanImage`` subtracts a mean image; on the CPU ``pipeline.crops`` turns the decoded
    images and draws into the batch (``normalize_in_graph`` overrides the choice, for tests of the GPU path's
    arithmetic on a CPU).
    """

    def __init__(
        self,
        spec: DataSpec,
        plan: SplitPlan,
        norm: Norm,
        *,
        seed: int,
        threads: int,
        gpu: bool,
        device_id: int | None,
        debug: bool,
        normalize_in_graph: bool | None = None,
    ) -> None:
        # DALI is imported only when used, so data.loader=torch also runs where it is not installed
        from pipeline.crops import CropNormalizer
        from pipeline.dali import DRAW_OUTPUTS, MeanImage, output_names

        in_graph = gpu if normalize_in_graph is None else normalize_in_graph
        self.name = f"dali ({'normalizing on the GPU' if in_graph else 'decoding'} graph)"  # checkpoints fit one
        self._build = dict(
            spec=spec, seed=seed, gpu=gpu, normalize=in_graph, device_id=device_id, threads=threads, debug=debug
        )
        self.plan, self.norm, self.gpu, self.device_id, self.debug = plan, norm, gpu, device_id, debug
        self.tencrop = plan.mode == "tencrop"
        self.output_names = output_names(self.tencrop, debug)
        self.draw_names = () if self.tencrop else DRAW_OUTPUTS
        self.pipe = self._make()
        self.ran = 0
        device = torch.device("cuda", device_id) if gpu else torch.device("cpu")
        pixel_mean = norm.mean.ndim == 3
        self.mean_image = MeanImage(norm, plan, spec.crop_size, device) if in_graph and pixel_mean else None
        self.crops = None
        if not in_graph:
            self.crops = CropNormalizer(norm, plan.image_size, spec.crop_size, plan.batch, self.tencrop)

    def _make(self, checkpoint: bytes | None = None):
        from pipeline.dali import build_pipeline, reader_batches

        pipe = build_pipeline(self.plan, self.norm, checkpoint=checkpoint, **self._build)
        self.per_epoch = reader_batches(pipe, self.plan)
        return pipe

    def _tensor(self, outputs, real: int) -> torch.Tensor:
        """A normalized DALI batch as a torch tensor on the pipeline's device.

        CPU: zero-copy. The dynamic executor (``exec_dynamic=True``) never reuses an output buffer that is still
        referenced, and the numpy view keeps it referenced. GPU: one device copy into PyTorch's caching allocator.
        """
        from nvidia.dali import types
        from nvidia.dali.plugin.pytorch import feed_ndarray

        batch = outputs.as_tensor()
        if not self.gpu:
            return torch.from_numpy(np.asarray(batch))[:real]
        device = torch.device("cuda", self.device_id)
        dtype = torch.float16 if outputs.dtype == types.FLOAT16 else torch.float32
        target = torch.empty(batch.shape(), dtype=dtype, device=device)
        feed_ndarray(batch, target, cuda_stream=torch.cuda.current_stream(device))
        return target[:real]

    def epoch(self, epoch: int, start: int) -> Iterator[dict]:
        """Batches ``start``.. of the current reader epoch (the reader counts epochs itself, ``epoch`` is unused)."""
        if start == 0 and self.ran:  # an unfinished reader epoch: run it out
            for _ in range(self.per_epoch - self.ran):
                self.pipe.run()
            self.ran = 0
        for index in range(start, self.plan.num_batches):
            outputs = dict(zip(self.output_names, self.pipe.run(), strict=True))
            self.ran += 1
            real = self.plan.real_in_batch(index)
            draws = tuple(np.asarray(outputs[name].as_tensor()) for name in self.draw_names)
            if self.crops is not None:
                images = self.crops(np.asarray(outputs["images"].as_tensor()), *draws)[:real]
            else:
                images = self._tensor(outputs["images"], real)
                if self.mean_image is not None:
                    self.mean_image.subtract(images, *(d[:real] for d in draws[:3]))
            labels = torch.from_numpy(np.array(outputs["labels"].as_tensor())[:real])
            batch = {"images": images, "labels": labels.pin_memory() if self.gpu else labels}  # an async copy
            if self.debug:
                batch.update(self._draws(outputs, draws, real))
            yield batch

    @staticmethod
    def _draws(outputs: dict, draws: tuple, real: int) -> dict:
        """keys (from ``path:offset:name`` source info) and, except for tencrop, crop_x, crop_y, flip, alpha, offset."""
        info = outputs["source_info"]
        result = {"keys": [bytes(np.array(info[i])).decode().rsplit(":", 1)[-1].split(".")[0] for i in range(real)]}
        if draws:
            crop_x, crop_y, flip, offset = (d[:real] for d in draws)
            result.update(
                crop_x=crop_x.astype(int),
                crop_y=crop_y.astype(int),
                flip=flip.astype(bool),
                alpha=np.array(outputs["alpha"].as_tensor())[:real].astype(np.float64),
                offset=offset.astype(np.float64),
            )
        return result

    def state_dict(self) -> dict:
        return {"checkpoint": self.pipe.checkpoint(), "ran": self.ran}

    def load_state_dict(self, state: dict) -> None:
        try:
            self.pipe = self._make(state["checkpoint"])
        except RuntimeError as err:
            reason = str(err).strip().splitlines()[0]
            raise DatasetError(
                f"the DALI checkpoint does not fit this pipeline ({reason}): resume with the same data config"
            ) from None
        self.ran = int(state["ran"])


class Loader:
    """One epoch per ``iter()``; see the module docstring and ``pipeline.config.SplitPlan`` for the counts."""

    def __init__(
        self, backend: Backend, plan: SplitPlan, meta: dict, norm: Norm, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.backend, self.plan, self.meta, self.norm = backend, plan, meta, norm
        self.device, self.dtype = device, dtype
        self.num_classes = len(meta["classes"])
        self.num_samples = plan.num_samples
        self.epoch = 0  # the epoch being (or last) iterated
        self.position = 0  # batches of it already handed out
        self._started = False  # whether iteration of ``epoch`` has begun
        self._resume = False  # a restored mid-epoch state: the next iter() continues it

    def __len__(self) -> int:
        return self.plan.num_batches

    def batches(self) -> Iterator[dict]:
        """The next epoch's batches as dicts (``images``, ``labels``, and the draws when built with debug)."""
        if self._started and not self._resume:
            self.epoch, self.position = self.epoch + 1, 0
        self._started, self._resume = True, False
        for batch in self.backend.epoch(self.epoch, self.position):
            self.position += 1
            batch["images"] = batch["images"].to(self.device, self.dtype, non_blocking=True)
            batch["labels"] = batch["labels"].to(self.device, torch.int64, non_blocking=True)
            yield batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch["images"], batch["labels"]

    def _identity(self) -> dict:
        plan = self.plan
        return {
            "split": plan.split,
            "mode": plan.mode,
            "rank": plan.rank,
            "world_size": plan.world_size,
            "batch": plan.batch,
            "count": plan.count,
            "backend": self.backend.name,
        }

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "started": self._started,
            "identity": self._identity(),
            "backend": self.backend.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        saved, mine = dict(state["identity"]), self._identity()
        # states written before backends had names carry the class name; DALI's then says if its graph differs
        saved["backend"] = {"TorchBackend": "torch", "DaliBackend": self.backend.name}.get(
            saved["backend"], saved["backend"]
        )
        if saved != mine:
            raise DatasetError(
                f"loader state is for {saved}, this loader is {mine}: resume with the same data config and world size"
            )
        self.backend.load_state_dict(state["backend"])
        self.epoch, self.position, self._started = int(state["epoch"]), int(state["position"]), bool(state["started"])
        self._resume = 0 < self.position < len(self)


def _use_gpu(spec: DataSpec, device: torch.device) -> bool:
    if spec.device == "gpu" and spec.loader != "dali":
        raise DatasetError(
            f"data.device=gpu asks for GPU augmentation, which only data.loader=dali does "
            f"(data.loader={spec.loader} augments on the CPU): use data.loader=dali or data.device=auto"
        )
    if spec.device == "gpu" and device.type != "cuda":
        raise DatasetError(
            f"data.device=gpu needs a CUDA device, and this process runs on {device}: use data.device=auto|cpu"
        )
    return spec.loader == "dali" and device.type == "cuda" and spec.device in ("auto", "gpu")


def build_loader(
    data_cfg: Mapping,
    split: str,
    mode: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    debug: bool = False,
) -> Loader:
    """This rank's loader for ``split`` in ``mode`` (train | center | tencrop); see ``conf/data/imagenet.yaml``.

    ``debug`` (DALI and torch) adds each sample's key and draws (crop_x, crop_y, flip, alpha, offset) to
    ``Loader.batches()``; ``pipeline.preview`` uses it.
    """
    spec = DataSpec.from_cfg(data_cfg)
    meta, stats = load_dataset(spec)
    plan = plan_split(spec, meta, split, mode, rank, world_size)
    norm = Norm.from_stats(spec, stats, plan.image_size)
    device = torch.device(device)
    gpu = _use_gpu(spec, device)
    threads = spec.threads_per_rank(world_size)
    if spec.loader == "torch":
        backend = TorchBackend(spec, plan, norm, seed=seed, threads=threads, pin_memory=device.type == "cuda")
    else:
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        backend = DaliBackend(spec, plan, norm, seed=seed, threads=threads, gpu=gpu, device_id=device_id, debug=debug)
    return Loader(backend, plan, meta, norm, device, TORCH_DTYPES[spec.dtype])
