"""The DALI pipelines, pixel by pixel, against numpy applied to the stored JPEGs (decoded by OpenCV)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from webdataset.tariterators import tarfile_samples

from pipeline.config import DataSpec, Norm, load_dataset, plan_split
from pipeline.crops import BufferPool
from pipeline.lighting import augment_numpy, center_offset, lighting_offset, tencrop_offsets
from pipeline.loader import DaliBackend, Loader, build_loader
from preprocess.shard_format import (
    DatasetError,
    PixelStats,
    Sample,
    read_meta,
    shard_paths,
    write_json_atomic,
    write_shard,
)

CROP = 64  # of the 80 px test shards


def stored_images(root: Path, split: str) -> dict[str, np.ndarray]:
    """key -> RGB uint8 of every stored JPEG of a split (OpenCV's libjpeg-turbo, independent of DALI)."""
    images = {}
    for path in shard_paths(root, split, read_meta(root)):
        for sample in tarfile_samples([{"url": str(path)}]):
            bgr = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
            images[sample["__key__"]] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    return images


def data_cfg(root: Path, **overrides) -> dict:
    cfg = {"root": str(root), "loader": "dali", "batch_size": 16, "crop_size": CROP, "threads": 2}
    return {**cfg, **overrides}


def dali_loader(cfg: dict, split: str, mode: str, arithmetic: str, debug: bool = False) -> Loader:
    """The CPU path (``pipeline.crops``), the GPU path's arithmetic (``crop_mirror_normalize`` in the graph,
    then ``MeanImage``) run with CPU operators, or the GPU path itself (mixed decoding, GPU operators)."""
    if arithmetic == "cpu":
        return build_loader(cfg, split, mode, debug=debug)
    if arithmetic == "gpu":
        return build_loader(cfg, split, mode, debug=debug, device="cuda:0")
    spec = DataSpec.from_cfg(cfg)
    meta, stats = load_dataset(spec)
    plan = plan_split(spec, meta, split, mode, 0, 1)
    norm = Norm.from_stats(spec, stats, plan.image_size)
    backend = DaliBackend(
        spec, plan, norm, seed=0, threads=2, gpu=False, device_id=None, debug=debug, normalize_in_graph=True
    )
    return Loader(backend, plan, meta, norm, torch.device("cpu"), torch.float32)


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: nvJPEG decoding, GPU operators")
ARITHMETIC = ["cpu", "graph", pytest.param("gpu", marks=NEEDS_GPU)]


def assert_image(actual: torch.Tensor, expected: np.ndarray, arithmetic: str, std: np.ndarray | None = None) -> None:
    """``actual`` is ``expected`` up to float32 rounding; from the GPU path up to decoding: nvJPEG's inverse DCT
    is not libjpeg-turbo's (``stored_images``), so pixels may differ by a few levels, rarely and without bias."""
    actual = actual.float().cpu().numpy()
    if arithmetic != "gpu":
        np.testing.assert_allclose(actual, expected, atol=2e-3)
        return
    levels = np.abs(actual - expected) * (1.0 if std is None else std[:, None, None])  # on the 0-255 scale
    assert levels.mean() < 0.5 and levels.max() < 8


@pytest.mark.parametrize(
    "overrides",
    [
        {"mean": "pixel", "lighting": {"sigma": 0.1, "scale": "sqrt"}},
        {"mean": "channel", "std": True, "lighting": {"sigma": 0.1, "scale": "unit"}},
        {"mean": "pixel", "std": True, "lighting": {"sigma": 0.1, "scale": "sqrt"}},  # as the demo
    ],
    ids=["pixel-mean", "channel-mean-std", "pixel-mean-std"],
)
@pytest.mark.parametrize("arithmetic", ARITHMETIC)
def test_train_output_is_the_formula_for_its_draws(shard_root: Path, overrides: dict, arithmetic: str) -> None:
    cfg = data_cfg(shard_root, **overrides)
    stats, stored = PixelStats.load(shard_root), stored_images(shard_root, "train")
    mean = stats.mean_image if cfg["mean"] == "pixel" else stats.mean
    std = np.sqrt(np.diag(stats.cov)) if cfg.get("std") else None
    loader = dali_loader(cfg, "train", "train", arithmetic, debug=True)
    checked = 0
    for batch in loader.batches():
        expected_offset = lighting_offset(batch["alpha"], stats.eigval, stats.eigvec, cfg["lighting"]["scale"])
        np.testing.assert_allclose(batch["offset"], expected_offset, atol=1e-4)
        for i, key in enumerate(batch["keys"]):
            x, y, flip = int(batch["crop_x"][i]), int(batch["crop_y"][i]), bool(batch["flip"][i])
            assert 0 <= x <= 80 - CROP and 0 <= y <= 80 - CROP
            expected = augment_numpy(stored[key], x, y, CROP, flip, expected_offset[i], mean, std)
            assert_image(batch["images"][i], expected, arithmetic, std)
            checked += 1
        if checked >= 48:
            break
    assert batch["images"].shape == (16, 3, CROP, CROP) and batch["flip"].any() and not batch["flip"].all()


def test_crops_cover_every_offset_uniformly_and_flips_are_fair(shard_root: Path) -> None:
    crop, margin = 76, 4
    loader = build_loader(data_cfg(shard_root, crop_size=crop), "train", "train", debug=True)
    draws = [(b["crop_x"], b["crop_y"], b["flip"]) for _ in range(2) for b in loader.batches()]
    xs, ys, flips = (np.concatenate(column) for column in zip(*draws, strict=True))
    assert len(xs) == 320
    for values in (xs, ys):
        counts = np.bincount(values, minlength=margin + 1)
        assert len(counts) == margin + 1 and counts.min() >= 35 and counts.max() <= 95  # 64 expected each
    corners = {(int(x), int(y)) for x, y in zip(xs, ys, strict=True)}
    assert {(0, 0), (margin, 0), (0, margin), (margin, margin)} <= corners
    assert 0.38 <= flips.mean() <= 0.62


def test_switched_off_augmentation_gives_the_centre_crop(shard_root: Path) -> None:
    off = data_cfg(shard_root, random_crop=False, flip=False, lighting={"sigma": 0.0})
    train = next(build_loader(off, "train", "train", debug=True).batches())
    stored, mean = stored_images(shard_root, "train"), PixelStats.load(shard_root).mean_image
    mid = center_offset(80, CROP)
    assert (train["crop_x"] == mid).all() and (train["crop_y"] == mid).all() and not train["flip"].any()
    assert not train["alpha"].any() and not train["offset"].any()
    for i, key in enumerate(train["keys"]):
        expected = augment_numpy(stored[key], mid, mid, CROP, False, np.zeros(3), mean, None)
        np.testing.assert_allclose(train["images"][i].numpy(), expected, atol=2e-3)


@pytest.mark.parametrize("mean_mode", ["pixel", "channel"])
@pytest.mark.parametrize("arithmetic", ARITHMETIC)
def test_center_and_tencrop_positions_are_exact(shard_root: Path, mean_mode: str, arithmetic: str) -> None:
    cfg = data_cfg(shard_root, mean=mean_mode, batch_size=8)
    stats, stored = PixelStats.load(shard_root), stored_images(shard_root, "val")
    mean = stats.mean_image if mean_mode == "pixel" else stats.mean
    center = next(dali_loader(cfg, "val", "center", arithmetic, debug=True).batches())
    tencrop = next(iter(dali_loader(cfg, "val", "tencrop", arithmetic)))[0]
    assert tencrop.shape == (8, 10, 3, CROP, CROP)
    patches = [(x, y, flip) for flip in (False, True) for x, y in tencrop_offsets(80, CROP)]
    for i, key in enumerate(center["keys"]):
        mid = center_offset(80, CROP)
        expected = augment_numpy(stored[key], mid, mid, CROP, False, np.zeros(3), mean, None)
        assert_image(center["images"][i], expected, arithmetic)
        for j, (x, y, flip) in enumerate(patches):
            expected = augment_numpy(stored[key], x, y, CROP, flip, np.zeros(3), mean, None)
            assert_image(tencrop[i, j], expected, arithmetic)


@pytest.fixture(scope="module")
def gray_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 uniform mid-gray 24x24 JPEGs (decoded exactly) with hand-made statistics: eigvec = identity."""
    root = tmp_path_factory.mktemp("gray")
    ok, jpeg = cv2.imencode(".jpg", np.full((24, 24, 3), 128, np.uint8))
    samples = [Sample(f"g{i:03d}", jpeg.tobytes(), i % 2) for i in range(64)]
    write_shard(root / "train" / "train-000000.tar", samples)
    eigval = np.array([400.0, 100.0, 25.0])
    PixelStats(np.zeros((24, 24, 3)), np.array([100.0, 110.0, 120.0]), np.diag(eigval), eigval, np.eye(3), 1).save(root)
    classes = [{"index": i, "wnid": f"c{i}", "name": f"class{i}"} for i in range(2)]
    shards = [{"name": "train-000000.tar", "count": 64, "bytes": 0, "sha256": ""}]
    write_json_atomic(
        root / "meta.json",
        {"classes": classes, "splits": {"train": {"count": 64, "shards": shards}}, "settings": {"image_size": 24}},
    )
    return root


@pytest.mark.parametrize(
    ("scale", "weights"), [("sqrt", [20.0, 10.0, 5.0]), ("unit", [400 / 255, 100 / 255, 25 / 255])]
)
def test_lighting_is_one_offset_per_image_with_std_sigma(gray_root: Path, scale: str, weights: list[float]) -> None:
    cfg = data_cfg(gray_root, crop_size=16, mean="channel", lighting={"sigma": 0.1, "scale": scale})
    loader = build_loader(cfg, "train", "train", debug=True)
    alphas = []
    for _ in range(6):
        for batch in loader.batches():
            images = batch["images"].numpy().astype(np.float64)
            # gray 128 plus the offset minus the channel mean, the same value at every pixel of a channel
            expected = 128.0 + batch["alpha"] * weights - [100.0, 110.0, 120.0]
            np.testing.assert_allclose(images, np.broadcast_to(expected[:, :, None, None], images.shape), atol=1e-3)
            alphas.append(batch["alpha"])
    alphas = np.concatenate(alphas)
    assert alphas.shape == (384, 3)
    assert np.abs(alphas.std(axis=0) - 0.1).max() < 0.02 and np.abs(alphas.mean(axis=0)).max() < 0.02
    assert len(np.unique(alphas[:, 0])) == len(alphas)  # a fresh draw per image and presentation


@pytest.mark.parametrize("mode", ["train", "center", "tencrop"])
def test_gpu_graph_is_defined_without_a_gpu(shard_root: Path, mode: str) -> None:
    """The GPU variant's graph (mixed decoding, GPU operators) is defined here; building it needs a GPU."""
    from pipeline.dali import augment_pipeline

    spec = DataSpec.from_cfg(data_cfg(shard_root, dtype="float16", lighting={"sigma": 0.1}))
    meta, stats = load_dataset(spec)
    plan = plan_split(spec, meta, "train", mode, 0, 1)
    norm = Norm.from_stats(spec, stats, plan.image_size)
    kwargs = dict(crop=CROP, random_crop=True, flip=True, sigma=0.1, dtype="float16", reader_seed=0, shuffle_buffer=64)
    pipe = augment_pipeline(plan, norm, gpu=True, normalize=True, batch_size=4, num_threads=1, device_id=0, **kwargs)
    assert pipe is not None


@NEEDS_GPU
@pytest.mark.parametrize("mode", ["center", "tencrop"])
def test_gpu_path_gives_the_cpu_paths_images(shard_root: Path, mode: str) -> None:
    """The same images from the GPU graph as from the CPU path, up to decoding: nvJPEG's inverse DCT is not
    libjpeg-turbo's, so pixels may differ by a few levels, rarely and without bias."""
    cfg = data_cfg(shard_root, std=True)
    std = torch.from_numpy(np.sqrt(np.diag(PixelStats.load(shard_root).cov))).float().view(3, 1, 1)
    on_cpu, on_gpu = build_loader(cfg, "val", mode), build_loader(cfg, "val", mode, device="cuda:0")
    batches = 0
    for (cpu_images, cpu_labels), (gpu_images, gpu_labels) in zip(on_cpu, on_gpu, strict=True):
        assert gpu_images.device.type == "cuda" and gpu_images.shape == cpu_images.shape
        assert torch.equal(gpu_labels.cpu(), cpu_labels.cpu())
        levels = (gpu_images.float().cpu() - cpu_images.float()).abs() * std  # back on the 0-255 scale
        assert levels.mean() < 0.5 and levels.max() < 8
        batches += 1
    assert batches > 0


def test_output_buffers_are_reused_only_when_released() -> None:
    pool = BufferPool((2, 3))
    held = torch.from_numpy(pool.take())[:1]  # a view of a batch the trainer still holds
    assert pool.take() is pool.buffers[1]  # the held buffer is skipped
    assert pool.take() is pool.buffers[1]  # the second was released at once: reused
    del held
    assert pool.take() is pool.buffers[0] and len(pool.buffers) == 2


def test_a_loader_state_restores_only_into_a_pipeline_of_the_same_graph(shard_root: Path) -> None:
    """A GPU machine's checkpoint (normalizing graph) resumed on a CPU one (decoding graph): one line, no traceback."""
    graph = dali_loader(data_cfg(shard_root), "train", "train", "graph")
    next(graph.batches())
    with pytest.raises(DatasetError, match="normalizing on the GPU graph"):
        dali_loader(data_cfg(shard_root), "train", "train", "cpu").load_state_dict(graph.state_dict())
