"""The pipeline's pure maths against hand computations: lighting, crop geometry, rank shares, batch counts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from pipeline.config import DataSpec, SplitPlan, load_dataset, ranks_on_this_node, shard_range
from pipeline.lighting import (
    augment_numpy,
    channel_std,
    lighting_matrix,
    lighting_offset,
    mean_patch,
    tencrop_offsets,
)
from preprocess.shard_format import DatasetError

# fb.resnet.torch's ImageNet PCA on pixels in [0, 1] (eigvec columns belong to eigval entries)
FB_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
FB_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]])


def test_unit_scale_is_fb_resnet_lighting_on_0_1_pixels() -> None:
    alpha = np.array([0.3, -1.2, 0.7])
    # fb.resnet.torch: rgb = eigvec * (alpha * eigval), summed over components, added to [0, 1] pixels
    expected_01 = np.array([sum(FB_EIGVEC[c, i] * alpha[i] * FB_EIGVAL[i] for i in range(3)) for c in range(3)])
    eigval_255 = FB_EIGVAL * 255**2  # the same statistics on the 0-255 scale, as stats.npz stores them
    got = lighting_offset(alpha, eigval_255, FB_EIGVEC, "unit")
    np.testing.assert_allclose(got, 255 * expected_01, rtol=1e-12)


def test_sqrt_scale_is_cuda_convnet2_lighting() -> None:
    alpha = np.array([[0.1, 0.2, -0.3], [0.0, 0.0, 1.0]])
    eigval = np.array([121.78, 37.09, 19.72]) ** 2  # cuda-convnet2's stdevs, squared
    eigvec = np.linalg.qr(np.arange(9.0).reshape(3, 3) + np.eye(3))[0]
    expected = np.stack([eigvec @ (a * np.array([121.78, 37.09, 19.72])) for a in alpha])
    np.testing.assert_allclose(lighting_offset(alpha, eigval, eigvec, "sqrt"), expected, rtol=1e-12)
    np.testing.assert_allclose(lighting_matrix(eigval, eigvec, "sqrt") @ alpha[0], expected[0], rtol=1e-12)
    with pytest.raises(ValueError, match="lighting.scale"):
        lighting_offset(alpha, eigval, eigvec, "linear")


def test_augment_numpy_crops_flips_and_normalises_by_hand() -> None:
    image = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    mean_image = np.full((5, 6, 3), 2.0)
    mean_image[1, 4] = [10, 20, 30]
    out = augment_numpy(image, 2, 1, 3, True, np.array([1.0, 0.0, -1.0]), mean_image, np.array([1.0, 2.0, 4.0]))
    assert out.shape == (3, 3, 3)
    # output column 0 of a flipped 3-wide crop at x=2 is stored column 4; row 0 is stored row 1
    pixel = image[1, 4].astype(float)
    np.testing.assert_allclose(out[:, 0, 0], (pixel + [1, 0, -1] - [10, 20, 30]) / [1, 2, 4])
    np.testing.assert_allclose(out[:, 2, 2], (image[3, 2] + np.array([1, 0, -1]) - 2.0) / [1, 2, 4])
    np.testing.assert_allclose(mean_patch(mean_image, 2, 1, 3, True)[:, 0, 0], [10, 20, 30])


def test_tencrop_offsets_are_centre_and_corners() -> None:
    assert tencrop_offsets(256, 224) == [(16, 16), (0, 0), (32, 0), (0, 32), (32, 32)]
    assert tencrop_offsets(81, 64)[0] == (8, 8)


def test_channel_std_is_sqrt_of_the_covariance_diagonal() -> None:
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 9.0, 2.0], [0.0, 2.0, 16.0]])
    np.testing.assert_allclose(channel_std(cov), [2.0, 3.0, 4.0])


@pytest.mark.parametrize(("count", "world"), [(53, 2), (40, 3), (7, 7), (1000, 8)])
def test_shard_ranges_partition_the_split_like_dali(count: int, world: int) -> None:
    ranges = [shard_range(count, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    if (count, world) == (53, 2):
        assert ranges == [(0, 26), (26, 53)]  # what DALI's reader gave here (REFERENCE.md)


def test_ranks_on_this_node_follow_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    assert ranks_on_this_node(8) == 8  # no launcher says: every rank is here
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")  # srun, one rank per task, 2 nodes
    assert ranks_on_this_node(8) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun or train.main's own workers say it exactly
    assert ranks_on_this_node(8) == 2
    cores = len(os.sched_getaffinity(0))
    assert DataSpec.from_cfg({"root": "x"}).threads_per_rank(8) == max(1, cores // 2)
    assert DataSpec.from_cfg({"root": "x", "threads": 3}).threads_per_rank(8) == 3


def _plan(mode: str, count: int, rank: int, world: int, batch: int) -> SplitPlan:
    return SplitPlan("x", mode, (), (count,), count, rank, world, batch, 80)


def test_training_batches_are_equal_and_full_on_every_rank() -> None:
    plans = [_plan("train", 53, r, 2, 9) for r in range(2)]  # parts of 26 and 27 samples
    assert [p.num_batches for p in plans] == [2, 2]  # floor(26 / 9): the 27th sample's batch would be partial
    assert [p.num_samples for p in plans] == [18, 18]


def test_evaluation_counts_every_sample_once() -> None:
    plans = [_plan("center", 40, r, 3, 4) for r in range(3)]  # parts 13, 13, 14
    assert [p.num_samples for p in plans] == [13, 13, 14]
    assert [p.num_batches for p in plans] == [4, 4, 4]
    assert [[p.real_in_batch(i) for i in range(5)] for p in plans] == [
        [4, 4, 4, 1, 0],
        [4, 4, 4, 1, 0],
        [4, 4, 4, 2, 0],
    ]


def test_meta_without_image_size_is_one_readable_line(tmp_path) -> None:
    (tmp_path / "val").mkdir()
    for name in ("val-000000.tar", "val-000000.idx"):
        (tmp_path / "val" / name).touch()
    shard = {"name": "val-000000.tar", "count": 1, "bytes": 0, "sha256": ""}
    meta = {"classes": [], "splits": {"val": {"count": 1, "shards": [shard]}}, "settings": {}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"meta.json is not build_shards' meta.json \(no settings.image_size\)"):
        load_dataset(DataSpec.from_cfg({"root": str(tmp_path), "batch_size": 1}))  # what every loader reads first


def test_bad_config_is_one_readable_line() -> None:
    with pytest.raises(DatasetError, match=r"data.root is not set"):
        DataSpec.from_cfg({"root": "???"})
    with pytest.raises(DatasetError, match=r"data.mean='median' is not one of pixel\|channel\|none") as err:
        DataSpec.from_cfg({"root": "/x", "mean": "median"})
    assert "\n" not in str(err.value)
