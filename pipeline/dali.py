"""The DALI pipelines: train (random crop, flip, PCA lighting, mean), centre crop and ten-crop.

One graph for both devices: ``device="gpu"`` decodes with nvJPEG (``"mixed"``) and augments on the GPU,
``device="cpu"`` runs every operator on the CPU (``device_id=None``). The random draws (crop corner, flip,
alpha) are argument inputs and so always live on the CPU; they are identical for both devices.

Every training output is ``(x[crop, flip] + M @ alpha - mean[crop, flip]) / std`` with ``x`` the stored
0-255 image (see ``pipeline.lighting``). Lighting and the channel mean are folded into
``crop_mirror_normalize``'s per-sample ``mean`` (``(x + o) - m = x - (m - o)``). A mean image is not in the
graph: ``MeanImage`` subtracts its window (``mean[crop, flip] / std``) from each finished output, at the
crop corner and flip the graph outputs. In the graph it took two more float passes over every image
(arithmetic on the whole decoded image, then a float crop instead of a uint8 one), which held the CPU
pipeline at 0.46-0.57 of the JPEG decoding rate; after the batch it is one in-place pass reading a
cache-resident table (0.62-0.65; docs/pipeline.md).

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
# after images, labels with a mean image or debug; not in tencrop (its windows are fixed)
WINDOW_OUTPUTS = ("crop_x", "crop_y", "flip")
DEBUG_OUTPUTS = ("source_info", "alpha", "offset")  # last, when debug; tencrop: source_info only
# DALI has no bfloat16: it outputs float32 and the loader casts
DALI_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}


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
    reader_seed: int,
    shuffle_buffer: int,
    debug: bool = False,
):
    """Outputs ``images, labels, *WINDOW_OUTPUTS`` (plus ``DEBUG_OUTPUTS`` when ``debug``) for ``plan.mode``.

    With a mean image the images still lack it (see ``MeanImage``) and are float32 (a float16 output would round
    before the subtraction; the loader casts after it).
    """
    jpegs, labels = _read(plan, reader_seed, shuffle_buffer)
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
    pixel_mean = norm.mean.ndim == 3
    channel_mean = np.zeros(3, np.float32) if pixel_mean else norm.mean.astype(np.float32)
    std = (norm.std if norm.std is not None else np.ones(3)).astype(np.float32).tolist()
    common = dict(plan=plan, std=std, crop=crop, dtype=types.FLOAT if pixel_mean else DALI_DTYPES[dtype])
    labels = fn.reshape(labels, shape=[])

    if plan.mode == "tencrop":
        patches = [
            _normalize(images, float(x), float(y), mirror, mean=channel_mean.tolist(), **common)
            for mirror in (0, 1)
            for x, y in tencrop_offsets(plan.image_size, crop)
        ]
        stacked = fn.stack(*patches, axis=0, axis_name="F")
        return (stacked, labels, fn.get_property(jpegs, key="source_info")) if debug else (stacked, labels)

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
    # the per-sample mean argument, channel_mean - matrix @ alpha, in one operator (per-operator costs
    # dominate on 3 numbers: the same sum written as DALI arithmetic took 6 operators and ~15% of the CPU time)
    mean = fn.coord_transform(alpha, M=(-matrix).ravel().tolist(), T=channel_mean.tolist())
    out = _normalize(images, x, y, mirror, mean=fn.reshape(mean, shape=[3]), **common)
    if not debug:
        return (out, labels, x, y, mirror) if pixel_mean else (out, labels)
    offset = fn.coord_transform(alpha, M=matrix.ravel().tolist())
    info = fn.get_property(jpegs, key="source_info")
    return out, labels, x, y, mirror, info, fn.reshape(alpha, shape=[3]), fn.reshape(offset, shape=[3])


class MeanImage:
    """Subtracts the mean image from finished outputs: ``images[i] -= (mean / std)[window of i]``, in place.

    The windows come from a table of the scaled mean image and its mirror image, CHW (1.5 MB at 256 px, so it
    stays in cache); a mirrored output at corner x takes the mirror image's window at ``size - crop - x``.
    CPU: a numpy loop over the samples, single-threaded (torch's intra-op threads competed with DALI's and lost
    a fifth of the throughput). GPU: one gather of all windows and one subtraction (no kernel per sample).
    """

    def __init__(self, norm: Norm, plan: SplitPlan, crop: int, device: torch.device) -> None:
        std = norm.std if norm.std is not None else np.ones(3)
        scaled = (norm.mean / std).astype(np.float32)
        table = np.stack([scaled, scaled[:, ::-1]]).transpose(0, 3, 1, 2)  # (mirror, C, H, W)
        self.crop, self.far, self.tencrop = crop, plan.image_size - crop, plan.mode == "tencrop"
        if self.tencrop:  # the ten fixed windows in output order, subtracted by broadcasting
            corners = tencrop_offsets(plan.image_size, crop)
            table = np.stack([self._window(table, x, y, m) for m in (0, 1) for x, y in corners])
        self.table = np.ascontiguousarray(table)
        if device.type != "cpu":
            self.table = torch.from_numpy(self.table).to(device)
            # every window as a view: (mirror, C, y, x, crop, crop)
            self.windows = None if self.tencrop else self.table.unfold(2, crop, 1).unfold(3, crop, 1)

    def _window(self, table, x: int, y: int, mirror: int):
        x = self.far - x if mirror else x
        return table[mirror, :, y : y + self.crop, x : x + self.crop]

    def subtract(self, images: torch.Tensor, crop_x=(), crop_y=(), flip=()) -> None:
        """``images`` (B, [10,] 3, crop, crop); the B corners and flips of their windows (none for tencrop)."""
        if images.device.type != "cpu":
            if self.tencrop:
                images -= self.table
                return
            x, y, mirror = (torch.as_tensor(np.asarray(v), device=images.device).long() for v in (crop_x, crop_y, flip))
            images -= self.windows[mirror, :, y, torch.where(mirror.bool(), self.far - x, x)]
            return
        target = images.numpy()
        if self.tencrop:
            target -= self.table
            return
        for i, (x, y, mirror) in enumerate(zip(crop_x, crop_y, flip, strict=True)):
            target[i] -= self._window(self.table, int(x), int(y), int(mirror))


def build_pipeline(
    plan: SplitPlan,
    norm: Norm,
    spec: DataSpec,
    *,
    seed: int,
    gpu: bool,
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
