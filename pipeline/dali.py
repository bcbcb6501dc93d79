"""The DALI pipelines: train (random crop, flip, PCA lighting, mean), centre crop and ten-crop.

Every training output is ``(x[crop, flip] + M @ alpha - mean[crop, flip]) / std`` with ``x`` the stored
0-255 image (see ``pipeline.lighting``). The graph reads, decodes and draws the random parameters (crop
corner, flip, lighting offset ``M @ alpha``) on both devices, with DALI's seeded, checkpointed operators;
the draws are argument inputs, so they live on the CPU and are the same on both. The arithmetic on pixels
depends on the device (``normalize``):

- GPU (nvJPEG decoding, ``device="mixed"``): ``crop_mirror_normalize`` in the graph, with lighting and a
  channel mean folded into its per-sample mean (``(x + o) - m = x - (m - o)``); a mean image is subtracted
  after the batch by ``MeanImage``, one gather and one subtraction.
- CPU (``device_id=None``): the graph ends at the decoded uint8 images and ``pipeline.crops`` does all of it
  in one compiled pass; DALI's CPU ``crop_mirror_normalize`` plus a mean-image pass cost more than decoding.

The reader gives every rank a contiguous 1/W of the samples (DALI shards by sample over the concatenated
tars). Training reshuffles the order of the tars after every epoch with a seed shared by all ranks (so
the ranks' parts stay disjoint and cover the split) and shuffles samples in a buffer. ``pad_last_batch``
makes every reader epoch end on a batch boundary, padded by repeating the last sample: the padded tail is
what ``pipeline.loader`` trims or skips.
"""

from __future__ import annotations

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import DataNode, Pipeline

from pipeline.config import DataSpec, Norm, SplitPlan
from pipeline.lighting import center_offset, tencrop_offsets
from preprocess.shard_format import IMAGE_EXT, LABEL_EXT, index_path

READER = "reader"
DRAW_OUTPUTS = ("crop_x", "crop_y", "flip", "offset")  # after images, labels; not in tencrop (fixed windows)
DEBUG_OUTPUTS = ("source_info", "alpha")  # last, when debug; tencrop: source_info only

# DALI has no bfloat16: it outputs float32 and the loader casts
DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


def output_names(tencrop: bool, debug: bool) -> tuple[str, ...]:
    """The names of ``augment_pipeline``'s outputs, in order."""
    draws = () if tencrop else DRAW_OUTPUTS
    extra = (DEBUG_OUTPUTS[:1] if tencrop else DEBUG_OUTPUTS) if debug else ()
    return ("images", "labels", *draws, *extra)


def _read(plan: SplitPlan, seed: int, shuffle_buffer: int) -> tuple[DataNode, DataNode]:
    return fn.readers.webdataset(
        paths=[str(p) for p in plan.paths],
        index_paths=[str(index_path(p)) for p in plan.paths],
        ext=[IMAGE_EXT, LABEL_EXT],
        dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error",
        shard_id=plan.rank,
        num_shards=plan.world_size,
        pad_last_batch=True,
        stick_to_shard=not plan.train,
        random_shuffle=plan.train,
        initial_fill=max(1, shuffle_buffer),
        name=READER,
        **({"shuffle_after_epoch": True, "shuffle_after_epoch_seed": seed} if plan.train else {}),
    )


def _normalize(
    images: DataNode,
    x: DataNode | float,
    y: DataNode | float,
    flip: DataNode | int,
    *,
    plan: SplitPlan,
    mean: DataNode | list[float],
    std: list[float],
    crop: int,
    dtype: types.DALIDataType,
) -> DataNode:
    """Crop at the integer corner (x, y), mirror, and compute ``(image - mean) / std`` as CHW.

    ``crop_pos = x / margin`` puts the window exactly at pixel ``x`` (checked for every offset).
    """
    margin = plan.image_size - crop
    scale = 1.0 / margin if margin else 0.0
    return fn.crop_mirror_normalize(
        images,
        crop=(crop, crop),
        crop_pos_x=x * scale,
        crop_pos_y=y * scale,
        mirror=flip,
        mean=mean,
        std=std,
        dtype=dtype,
        output_layout="CHW",
    )


@pipeline_def(enable_checkpointing=True)
def augment_pipeline(
    plan: SplitPlan,
    norm: Norm,
    *,
    crop: int,
    random_crop: bool,
    flip: bool,
    sigma: float,
    dtype: str,
    gpu: bool,
    normalize: bool,
    reader_seed: int,
    shuffle_buffer: int,
    debug: bool = False,
):
    """Outputs ``output_names(tencrop, debug)``: images, labels, then ``DRAW_OUTPUTS`` (not in tencrop), then
    ``DEBUG_OUTPUTS`` when ``debug``.

    ``normalize`` (the GPU path): images are ``crop_mirror_normalize``'s CHW outputs, a mean image still to be
    subtracted by ``MeanImage`` (float32 then: a float16 output would round before the subtraction; the loader
    casts after it). Otherwise (the CPU path) images are the decoded uint8 HWC images, for ``pipeline.crops``.
    """
    jpegs, labels = _read(plan, reader_seed, shuffle_buffer)
    # on a GPU, libjpeg-turbo's chroma upsampling too: the pixels (and stats.npz) of the CPU decoder
    decoder = {"device": "mixed", "jpeg_fancy_upsampling": True} if gpu else {"device": "cpu"}
    images = fn.decoders.image(jpegs, output_type=types.RGB, **decoder)
    labels = fn.reshape(labels, shape=[])
    info = [fn.get_property(jpegs, key="source_info")] if debug else []
    pixel_mean = norm.mean.ndim == 3
    channel_mean = np.zeros(3, np.float32) if pixel_mean else norm.mean.astype(np.float32)
    std = (norm.std if norm.std is not None else np.ones(3)).astype(np.float32).tolist()
    common = dict(plan=plan, std=std, crop=crop, dtype=types.FLOAT if pixel_mean else DALI_DTYPES[dtype])

    if plan.mode == "tencrop":
        if normalize:
            patches = [
                _normalize(images, float(x), float(y), mirror, mean=channel_mean.tolist(), **common)
                for mirror in (0, 1)
                for x, y in tencrop_offsets(plan.image_size, crop)
            ]
            images = fn.stack(*patches, axis=0, axis_name="F")
        return (images, labels, *info)

    # Switched-off draws are degenerate distributions, so every output exists in every mode.
    augment = plan.train
    positions = (
        [float(v) for v in range(plan.image_size - crop + 1)]
        if augment and random_crop
        else [float(center_offset(plan.image_size, crop))]
    )
    x, y = fn.random.uniform(values=positions), fn.random.uniform(values=positions)
    mirror = fn.random.coin_flip(probability=0.5 if augment and flip else 0.0)
    lighting = augment and norm.lighting is not None
    alpha = fn.random.normal(shape=[1, 3], stddev=sigma if lighting else 0.0)  # one 3-D point
    matrix = (norm.lighting if lighting else np.zeros((3, 3))).astype(np.float32)
    # M @ alpha in one operator (the same sum as DALI arithmetic took six, each with a per-sample cost)
    offset = fn.reshape(fn.coord_transform(alpha, M=matrix.ravel().tolist()), shape=[3])
    if normalize:  # (x + o) - m = x - (m - o): lighting rides in the per-sample mean
        images = _normalize(images, x, y, mirror, mean=types.Constant(channel_mean) - offset, **common)
    extra = [fn.reshape(alpha, shape=[3])] if debug else []
    return (images, labels, x, y, mirror, offset, *info, *extra)


class MeanImage:
    """Subtracts the mean image from ``crop_mirror_normalize``'s outputs: ``images[i] -= (mean / std)[window of i]``.

    In place, as one gather of every window and one subtraction (no kernel per sample on a GPU). The windows
    are views of a table of the scaled mean image and its mirror image, CHW; a mirrored output at corner x
    takes the mirror image's window at ``size - crop - x``.
    """

    def __init__(self, norm: Norm, plan: SplitPlan, crop: int, device: torch.device) -> None:
        std = norm.std if norm.std is not None else np.ones(3)
        scaled = (norm.mean / std).astype(np.float32)
        table = torch.from_numpy(np.stack([scaled, scaled[:, ::-1]]).transpose(0, 3, 1, 2).copy()).to(device)
        self.crop, self.far = crop, plan.image_size - crop
        self.windows = None  # tencrop: ``table`` holds its ten fixed windows, subtracted by broadcasting
        if plan.mode == "tencrop":
            corners = tencrop_offsets(plan.image_size, crop)
            self.table = torch.stack([self._window(table, x, y, m) for m in (0, 1) for x, y in corners])
        else:  # every window as a view: (mirror, C, y, x, crop, crop)
            self.table = table
            self.windows = table.unfold(2, crop, 1).unfold(3, crop, 1)

    def _window(self, table: torch.Tensor, x: int, y: int, mirror: int) -> torch.Tensor:
        x = self.far - x if mirror else x
        return table[mirror, :, y : y + self.crop, x : x + self.crop]

    def subtract(self, images: torch.Tensor, crop_x=(), crop_y=(), flip=()) -> None:
        """``images`` (B, [10,] 3, crop, crop); the B corners and flips of their windows (none for tencrop)."""
        if self.windows is None:
            images -= self.table
            return
        draws = torch.from_numpy(np.stack([np.asarray(v, np.int64) for v in (crop_x, crop_y, flip)]))
        if images.is_cuda:  # from pinned memory without blocking: a pageable copy would wait for the last step
            draws = draws.pin_memory().to(images.device, non_blocking=True)
        x, y, mirror = draws
        images -= self.windows[mirror, :, y, torch.where(mirror.bool(), self.far - x, x)]


def build_pipeline(
    plan: SplitPlan,
    norm: Norm,
    spec: DataSpec,
    *,
    seed: int,
    gpu: bool,
    normalize: bool,
    device_id: int | None,
    threads: int,
    checkpoint: bytes | None = None,
    debug: bool = False,
) -> Pipeline:
    """A built pipeline for this rank; ``checkpoint`` resumes the reader position and every random state.

    The augmentation seed differs per rank (independent draws); the shard-order seed is shared (disjoint parts).
    """
    pipe = augment_pipeline(
        plan,
        norm,
        crop=spec.crop_size,
        random_crop=spec.random_crop,
        flip=spec.flip,
        sigma=spec.lighting_sigma,
        dtype=spec.dtype,
        gpu=gpu,
        normalize=normalize,
        reader_seed=seed,
        shuffle_buffer=spec.shuffle_buffer,
        debug=debug,
        batch_size=plan.batch,
        num_threads=threads,
        device_id=device_id if gpu else None,
        seed=seed * 1000 + plan.rank + 1,
        prefetch_queue_depth=spec.prefetch,
        exec_dynamic=True,  # outputs stay valid while referenced: pipeline.loader hands them to torch without a copy
        checkpoint=checkpoint,
    )
    pipe.build()
    return pipe


def reader_batches(pipe: Pipeline, plan: SplitPlan) -> int:
    """Batches in one reader epoch of this rank (the padded shard size, rounded up to whole batches)."""
    meta = pipe.reader_meta(READER)
    per_shard = -(-meta["epoch_size_padded"] // plan.world_size)
    return -(-per_shard // plan.batch)
