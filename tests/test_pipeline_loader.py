"""build_loader: rank shares, epoch counts, reshuffles, resume, DALI vs torch, and the preview command."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_pipeline_dali import stored_images

from pipeline.lighting import augment_numpy
from pipeline.loader import build_loader
from preprocess.shard_format import DatasetError, PixelStats, read_meta

CROP = 64
LOADERS = ["dali", "torch"]


def data_cfg(root: Path, loader: str, **overrides) -> dict:
    cfg = {"root": str(root), "loader": loader, "batch_size": 16, "crop_size": CROP, "threads": 2}
    return {**cfg, **overrides}


def epoch_keys(loader) -> list[str]:
    return [key for batch in loader.batches() for key in batch["keys"]]


@pytest.mark.parametrize("kind", LOADERS)
def test_two_ranks_split_the_training_set_and_reshuffle_each_epoch(shard_root: Path, kind: str) -> None:
    every = set(stored_images(shard_root, "train"))
    loaders = [
        build_loader(data_cfg(shard_root, kind), "train", "train", rank=r, world_size=2, debug=True) for r in range(2)
    ]
    assert [len(loader) for loader in loaders] == [10, 10] and loaders[0].num_samples == 80
    epochs = [[epoch_keys(loader) for loader in loaders] for _ in range(2)]
    for rank0, rank1 in epochs:
        assert len(rank0) == len(rank1) == 80 and not set(rank0) & set(rank1) and set(rank0) | set(rank1) == every
    assert epochs[0][0] != epochs[1][0] and epochs[0][1] != epochs[1][1]


@pytest.mark.parametrize("kind", LOADERS)
def test_uneven_world_trains_in_lockstep_on_full_batches(shard_root: Path, kind: str) -> None:
    loaders = [
        build_loader(data_cfg(shard_root, kind, batch_size=12), "train", "train", rank=r, world_size=3, debug=True)
        for r in range(3)
    ]
    # 160 samples: parts of 53, 53, 54; 4 per rank and batch -> 13 full batches each; 1-2 samples sit out
    assert [len(loader) for loader in loaders] == [13, 13, 13]
    sizes, keys = [], []
    for loader in loaders:
        batches = list(loader.batches())
        sizes += [len(b["keys"]) for b in batches]
        keys += [k for b in batches for k in b["keys"]]
    assert set(sizes) == {4} and len(keys) == len(set(keys)) == 156


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("mode", ["center", "tencrop"])
def test_evaluation_counts_every_sample_once_when_the_split_is_uneven(shard_root: Path, kind: str, mode: str) -> None:
    every = stored_images(shard_root, "val")
    counted, labels = [], []
    for rank in range(3):  # 40 samples over 3 ranks: 13, 13, 14
        loader = build_loader(
            data_cfg(shard_root, kind, batch_size=12), "val", mode, rank=rank, world_size=3, debug=True
        )
        keys = epoch_keys(loader) if mode == "center" else None
        got = [(images.shape[0], y) for images, y in loader]
        assert sum(n for n, _ in got) == loader.num_samples == (13, 13, 14)[rank]
        counted += keys or []
        labels += [int(v) for _, y in got for v in y]
    assert len(labels) == 40
    if mode == "center":
        assert sorted(counted) == sorted(every)


def test_dali_and_torch_agree(shard_root: Path) -> None:
    for mode in ("center", "tencrop"):
        cfg = {"batch_size": 8, "mean": "channel", "std": True, "dtype": "bfloat16"}
        dali = list(build_loader(data_cfg(shard_root, "dali", **cfg), "val", mode, rank=1, world_size=2))
        ref = list(build_loader(data_cfg(shard_root, "torch", **cfg), "val", mode, rank=1, world_size=2))
        assert len(dali) == len(ref) == 5  # 20 val samples per rank, 4 per batch
        for (a, ya), (b, yb) in zip(dali, ref, strict=True):
            assert a.dtype == b.dtype == torch.bfloat16 and ya.dtype == yb.dtype == torch.int64
            assert torch.equal(ya, yb) and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), atol=0.02, rtol=0.01)  # bf16 rounding
    # training: the same counts and shapes; each loader's outputs are the formula for its own draws
    stored, stats = stored_images(shard_root, "train"), PixelStats.load(shard_root)
    for kind in LOADERS:
        loader = build_loader(data_cfg(shard_root, kind), "train", "train", rank=0, world_size=2, debug=True)
        assert (len(loader), loader.num_samples, loader.num_classes) == (10, 80, 10)
        batch = next(loader.batches())
        assert batch["images"].shape == (8, 3, CROP, CROP)
        for i, key in enumerate(batch["keys"]):
            expected = augment_numpy(
                stored[key],
                batch["crop_x"][i],
                batch["crop_y"][i],
                CROP,
                batch["flip"][i],
                batch["offset"][i],
                stats.mean_image,
                None,
            )
            np.testing.assert_allclose(batch["images"][i].numpy(), expected, atol=2e-3)


def signature(batch: dict) -> tuple:
    return tuple(batch["keys"]), batch["images"].numpy().tobytes()


@pytest.mark.parametrize("kind", LOADERS)
def test_state_dict_resumes_the_same_sequence(shard_root: Path, kind: str) -> None:
    cfg = data_cfg(shard_root, kind, lighting={"sigma": 0.1})

    def fresh():
        return build_loader(cfg, "train", "train", rank=1, world_size=2, seed=3, debug=True)

    reference = fresh()
    uninterrupted = [signature(b) for _ in range(3) for b in reference.batches()]
    assert len(uninterrupted) == 30
    for cut in (4, 10, 13):  # mid-epoch, at an epoch's end, mid-epoch after a boundary
        loader, seen = fresh(), []
        while len(seen) < cut:
            for batch in loader.batches():
                seen.append(signature(batch))
                if len(seen) == cut:
                    break
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        resumed = fresh()
        resumed.load_state_dict(state)
        while len(seen) < 30:
            seen += [signature(b) for b in resumed.batches()]
        assert seen == uninterrupted, f"resume after {cut} batches diverged"
    old_name = {"dali": "DaliBackend", "torch": "TorchBackend"}[kind]  # as states were written before names
    fresh().load_state_dict({**state, "identity": {**state["identity"], "backend": old_name}})
    with pytest.raises(DatasetError, match="same data config and world size"):
        build_loader(cfg, "train", "train", rank=0, world_size=1).load_state_dict(state)


def _rank_worker(rank: int, root: str, queue) -> None:
    loader = build_loader(data_cfg(Path(root), "dali"), "train", "train", rank=rank, world_size=2, debug=True)
    queue.put((rank, len(loader), epoch_keys(loader)))


def test_loaders_in_spawned_rank_processes(shard_root: Path) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, str(shard_root), queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = dict((rank, (n, keys)) for rank, n, keys in (queue.get(timeout=120) for _ in procs))
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert results[0][0] == results[1][0] == 10
    assert not set(results[0][1]) & set(results[1][1]) and len(set(results[0][1]) | set(results[1][1])) == 160


def run_preview(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.preview", *args], capture_output=True, text=True, timeout=180
    )


def test_preview_writes_a_batch_anyone_can_check(shard_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "preview"
    done = run_preview(f"data.root={shard_root}", "split=train", "n=8", f"out={out}", f"data.crop_size={CROP}")
    assert done.returncode == 0, done.stderr
    png = cv2.imread(str(out / "preview.png"))
    assert png is not None and png.shape[0] > 100 and png.shape[1] > 400
    batch = np.load(out / "batch.npz")
    stored, stats = stored_images(shard_root, "train"), PixelStats.load(shard_root)
    assert batch["images"].shape == (8, 3, CROP, CROP) and batch["alpha"].shape == batch["offset"].shape == (8, 3)
    assert batch["labels"].dtype == np.int64 and batch["flip"].dtype == bool
    names = {c["index"]: c["name"] for c in read_meta(shard_root)["classes"]}
    assert list(batch["class_names"]) == [names[int(label)] for label in batch["labels"]]
    for i, key in enumerate(batch["keys"]):
        offset = stats.eigvec @ (batch["alpha"][i] * np.sqrt(stats.eigval))  # the default: sqrt scale
        np.testing.assert_allclose(batch["offset"][i], offset, atol=1e-4)
        expected = augment_numpy(
            stored[str(key)],
            int(batch["crop_x"][i]),
            int(batch["crop_y"][i]),
            CROP,
            bool(batch["flip"][i]),
            offset,
            stats.mean_image,
            None,
        )
        np.testing.assert_allclose(batch["images"][i], expected, atol=2e-3)


def test_preview_reports_a_bad_root_in_one_line(tmp_path: Path) -> None:
    done = run_preview(f"data.root={tmp_path / 'missing'}", f"out={tmp_path / 'out'}")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "does not exist" in done.stderr and not (tmp_path / "out").exists()


def test_gpu_request_without_a_gpu_is_one_line(shard_root: Path) -> None:
    with pytest.raises(DatasetError, match=r"data.device=gpu needs a CUDA device, and this process runs on cpu"):
        build_loader(data_cfg(shard_root, "dali", device="gpu"), "train", "train", device="cpu")
    with pytest.raises(DatasetError, match=r"data.device=gpu .* only data.loader=dali does"):
        build_loader(data_cfg(shard_root, "torch", device="gpu"), "train", "train", device="cpu")


@pytest.mark.parametrize("mode", ["floor", "dali"])
def test_benchmark_ends_with_json_images_per_sec(shard_root: Path, mode: str) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "pipeline.py"
    args = [
        f"data.root={shard_root}",
        f"loader={mode}",
        "batches=2",
        "rounds=1",
        "warmup=1",
        "data.batch_size=16",
        f"data.crop_size={CROP}",
    ]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loader"] == mode and result["images"] == 32 and result["images_per_sec"] > 0


def test_held_batches_are_not_overwritten_by_later_ones(shard_root: Path) -> None:
    """DALI outputs reach torch without a copy: a batch kept by the caller must survive the next epochs."""
    loader = build_loader(data_cfg(shard_root, "dali"), "train", "train")
    held = [(images, images.clone()) for images, _ in loader]
    for _ in range(2):
        for images, _ in loader:
            images.add_(1.0)  # the trainer may work in place
    assert all(torch.equal(kept, copy) for kept, copy in held)


def test_a_torch_loader_epoch_leaves_the_global_random_state_alone(shard_root: Path) -> None:
    """Starting a DataLoader draws a seed; from torch's global generator, a resumed run's dropout would shift."""
    cfg = {"root": str(shard_root), "loader": "torch", "batch_size": 16, "crop_size": 64, "threads": 2}
    loader = build_loader(cfg, "train", "train")
    state = torch.get_rng_state()
    for _ in loader:
        pass
    assert torch.equal(torch.get_rng_state(), state)
