"""train.visualize and train.figure1: the figure maths against numpy and hand-computed values, and the commands
on real shards, a saved checkpoint and a fake ReLU/tanh sweep folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from preprocess.shard_format import DatasetError
from train.figure1 import Figure1Error, describe, epochs_to_reach, figure1
from train.model import AlexNet
from train.visualize import class_names, kernel_blocks, nearest, read_curves, visualize

TEST_CROP = 64  # conftest.TEST_CROP: 64 px crops of the 80 px shards
MODEL_CFG = {"columns": 2, "lrn": True, "overlapping_pool": True, "activation": "relu", "dropout": 0.5, "width": 0.25}


def val(top1: float, top5: float) -> dict[str, float]:
    return {"val_top1_err": top1, "val_top5_err": top5}


def save_run(run_dir: Path, shard_root: Path) -> Path:
    """A run dir as train.main leaves it: checkpoints/best.pt (the documented keys) and metrics.jsonl."""
    data = OmegaConf.to_container(OmegaConf.load("conf/data/imagenet.yaml"))
    data.update(root=str(shard_root), crop_size=TEST_CROP, batch_size=8, threads=1)
    torch.manual_seed(0)
    model = AlexNet(10, crop_size=TEST_CROP, **MODEL_CFG)
    state = {
        "model": model.state_dict(),
        "config": {"data": data, "model": MODEL_CFG},
        **dict.fromkeys(("optimizer", "schedule", "rng", "loader", "metrics"), {}),
        "epoch": 2,
        "step": 10,
    }
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, run_dir / "checkpoints" / "best.pt")
    lines = [
        {"kind": "step", "epoch": 1, "step": 5, "lr": 0.01, "loss": 2.3, "train_top1_err": 0.9},
        {"kind": "epoch", "epoch": 1, "step": 5, "lr": 0.01, "loss": 2.2, "train_top1_err": 0.85, **val(0.8, 0.3)},
        {"kind": "step", "epoch": 2, "step": 8, "lr": 0.005, "loss": 1.9, "train_top1_err": 0.7},
        {"kind": "epoch", "epoch": 2, "step": 10, "lr": 0.005, "loss": 1.7, "train_top1_err": 0.6, **val(0.5, 0.2)},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir / "checkpoints" / "best.pt"


def test_kernel_blocks_split_columns_and_scale_each_kernel() -> None:
    rng = np.random.default_rng(0)
    weight = rng.normal(scale=0.01, size=(8, 3, 11, 11))
    blocks = kernel_blocks(weight, columns=2, per_row=2)
    assert len(blocks) == 2 and all(block.shape == (23, 23, 3) for block in blocks)  # 2x2 kernels, 1 px gaps
    for column, block in enumerate(blocks):
        for i in range(4):
            w = weight[4 * column + i]
            expected = 0.5 + w.transpose(1, 2, 0) / (2 * np.abs(w).max())
            r, c = divmod(i, 2)
            np.testing.assert_allclose(block[12 * r : 12 * r + 11, 12 * c : 12 * c + 11], expected)
        assert np.all(block[11, :] == 1.0) and np.all(block[:, 11] == 1.0)  # white gaps
        assert block.min() >= 0.0 and block.max() <= 1.0
    assert len(kernel_blocks(weight, columns=1)) == 1


def test_nearest_matches_numpy_brute_force() -> None:
    rng = np.random.default_rng(1)
    queries, pool = rng.normal(size=(5, 16)), rng.normal(size=(40, 16))
    distances = np.sqrt(((queries[:, None, :] - pool[None, :, :]) ** 2).sum(-1))
    expected = np.argsort(distances, axis=1)[:, :6]
    np.testing.assert_array_equal(nearest(torch.from_numpy(queries), torch.from_numpy(pool), 6), expected)


def test_read_curves_places_steps_on_the_epoch_axis(tmp_path: Path, shard_root: Path) -> None:
    save_run(tmp_path, shard_root)
    curves = read_curves(tmp_path / "metrics.jsonl")
    np.testing.assert_allclose(curves["x"], [1, 2])
    np.testing.assert_allclose(curves["val_top1_err"], [0.8, 0.5])
    # step 5 ends epoch 1; step 8 is 3/5 of the way through epoch 2 (steps 5..10)
    np.testing.assert_allclose(curves["step_x"], [1.0, 1.6])


def test_visualize_writes_the_four_figures(tmp_path: Path, shard_root: Path) -> None:
    import matplotlib.image

    checkpoint = save_run(tmp_path / "run", shard_root)
    cfg = OmegaConf.to_container(OmegaConf.load("conf/visualize.yaml"))
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.update(checkpoint=str(checkpoint), out=str(tmp_path / "figures"), predictions=4, queries=2, pool=24)
    cfg["data"]["root"] = str(shard_root)
    written = visualize(cfg)
    names = ["figure3_kernels.png", "figure4_predictions.png", "figure4_retrieval.png", "curves.png"]
    assert [path.name for path in written] == names
    for path in written:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 150 and image.shape[1] > 300 and image.std() > 0.01, path.name
    assert not list((tmp_path / "figures").glob(".*"))  # no temporary files left behind


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path: Path, shard_root: Path) -> None:
    command = [sys.executable, "-m", "train.visualize", f"checkpoint={tmp_path}/nope.pt", f"data.root={shard_root}"]
    result = subprocess.run(command + [f"out={tmp_path}/f"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "nope.pt does not exist" in result.stderr
    assert not (tmp_path / "f").exists() or not any((tmp_path / "f").iterdir())


def test_a_wrong_data_root_is_reported_before_the_out_folder_is_made(tmp_path: Path, shard_root: Path) -> None:
    checkpoint = save_run(tmp_path / "run", shard_root)
    cfg = OmegaConf.to_container(OmegaConf.load("conf/visualize.yaml"))
    cfg.pop("defaults"), cfg.pop("hydra")
    cfg.update(checkpoint=str(checkpoint), out=str(tmp_path / "figures"))
    cfg["data"]["root"] = str(tmp_path / "no-shards")
    with pytest.raises(DatasetError, match="no-shards"):
        visualize(cfg)
    assert not (tmp_path / "figures").exists()


def test_class_names_fit_beside_their_bars() -> None:
    meta = {
        "classes": [
            {"index": 1, "name": "tench, Tinca tinca"},
            {"index": 0, "wnid": "n01"},
            {"index": 2, "name": "great white shark, white shark, man-eater, man-eating shark"},
            {"index": 3, "name": "a very long single class name without commas"},
        ]
    }
    assert class_names(meta) == ["n01", "tench", "great white shark", "a very long single clas…"]


def test_a_file_that_is_not_metrics_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text('{\n  "classes": []\n}\n')  # as build_shards writes it
    with pytest.raises(DatasetError, match="not a metrics.jsonl"):
        read_curves(tmp_path / "meta.json")


@pytest.mark.parametrize("bad", ["checkpoint=", "colour=red"])
def test_bad_arguments_are_one_line(tmp_path: Path, bad: str) -> None:
    command = [sys.executable, "-m", "train.visualize", "data.root=/x", f"out={tmp_path}", bad]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr


# ---------------------------------------------------------------- train.figure1


def write_job(sweep: Path, activation: str, errors: list[float], job_name: str = "") -> None:
    """A sweep job folder as Hydra and train.main leave it: .hydra/config.yaml and metrics.jsonl."""
    job = sweep / (job_name or f"model.activation={activation}")
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"model:\n  activation: {activation}\n  width: 0.25\n")
    lines = [{"kind": "step", "epoch": 1, "step": 3, "train_top1_err": 0.9, "loss": 2.3}]
    lines += [
        {"kind": "epoch", "epoch": e, "step": 5 * e, "train_top1_err": err, "loss": 1.0}
        for e, err in enumerate(errors, start=1)
    ]
    (job / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_epochs_to_reach_interpolates_between_epoch_ends() -> None:
    epochs = np.array([1.0, 2.0, 3.0, 4.0])
    # 0.45 at epoch 2 and 0.15 at epoch 3: 0.25 is two thirds of the way -> 2.667
    assert epochs_to_reach(epochs, np.array([0.8, 0.45, 0.15, 0.1]), 0.25) == pytest.approx(2 + 2 / 3)
    assert epochs_to_reach(epochs, np.array([0.2, 0.1, 0.1, 0.1]), 0.25) == 1.0
    assert epochs_to_reach(epochs, np.array([0.9, 0.8, 0.7, 0.6]), 0.25) is None


def test_figure1_from_a_sweep(tmp_path: Path) -> None:
    import matplotlib.image

    write_job(tmp_path, "relu", [0.6, 0.25, 0.1, 0.05, 0.02, 0.01])  # reaches 25% at epoch 2
    write_job(tmp_path, "tanh", [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.40, 0.35, 0.30, 0.25, 0.2, 0.1])  # at 10
    result = figure1(tmp_path)
    assert result["relu_epochs"] == pytest.approx(2.0) and result["tanh_epochs"] == pytest.approx(10.0)
    assert result["ratio"] == pytest.approx(5.0)
    assert "ReLU 5.0 times sooner" in describe(result)
    swapped = {**result, "relu_epochs": 10.0, "tanh_epochs": 2.0, "ratio": 0.2}
    assert "tanh got there 5.0 times sooner" in describe(swapped)
    image = matplotlib.image.imread(tmp_path / "figure1.png")
    assert image.shape[0] > 200 and image.std() > 0.01


def test_tanh_that_never_gets_there_gives_a_lower_bound(tmp_path: Path) -> None:
    write_job(tmp_path, "relu", [0.5, 0.2])
    write_job(tmp_path, "tanh", [0.9, 0.8, 0.7, 0.6])
    result = figure1(tmp_path, tmp_path / "out" / "f1.png")
    assert result["ratio"] is None and (tmp_path / "out" / "f1.png").is_file()
    # ReLU at 1 + (0.5 - 0.25) / 0.3 = 1.833 epochs; tanh not within 4 -> more than 4 / 1.833 = 2.2 times
    assert "more than 2.2 times sooner" in describe(result)


def test_two_runs_of_one_activation_are_refused_not_picked(tmp_path: Path) -> None:
    write_job(tmp_path, "relu", [0.5, 0.2])
    write_job(tmp_path, "relu", [0.5, 0.2], job_name="model.activation=relu,model.init=paper")
    write_job(tmp_path, "tanh", [0.9, 0.2])
    with pytest.raises(Figure1Error, match="2 runs with model.activation=relu"):
        figure1(tmp_path)


def test_figure1_out_without_suffix_is_a_png_and_bad_arguments_exit_2(tmp_path: Path) -> None:
    write_job(tmp_path, "relu", [0.5, 0.2])
    write_job(tmp_path, "tanh", [0.9, 0.2])
    assert figure1(tmp_path, tmp_path / "plot")["figure"] == str(tmp_path / "plot")
    assert (tmp_path / "plot").read_bytes()[:4] == b"\x89PNG"
    for args in (["nonsense"], [f"dir={tmp_path}", f"out={tmp_path / 'plot' / 'x.png'}"]):  # a file as a folder
        result = subprocess.run([sys.executable, "-m", "train.figure1", *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr.startswith("error:") and result.stderr.count("\n") == 1


def test_missing_run_is_a_one_line_error(tmp_path: Path) -> None:
    write_job(tmp_path, "relu", [0.5, 0.2])
    with pytest.raises(Figure1Error, match="model.activation=tanh"):
        figure1(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "train.figure1", f"dir={tmp_path}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "tanh" in result.stderr
