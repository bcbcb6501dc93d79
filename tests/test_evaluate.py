"""train.evaluate against an independent computation: the stored JPEGs decoded by OpenCV, cropped and normalised
in numpy, the model run by hand, top-k counted with numpy; ensembles, two ranks, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from webdataset.tariterators import tarfile_samples

from preprocess.cli import quote_paths
from preprocess.shard_format import PixelStats, read_meta, shard_paths
from train.checkpoint import save_checkpoint
from train.evaluate import run, split_paths
from train.metrics import multi_crop_name
from train.model import AlexNet

REPO = Path(__file__).resolve().parents[1]
CROP = 64  # of the 80 px test shards
MODEL = {"width": 0.125, "init": "kaiming", "dropout": 0.5}


def make_checkpoint(path: Path, seed: int, flip: bool) -> Path:
    """A checkpoint as train.main writes it, around a randomly initialised narrow AlexNet."""
    data = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "imagenet.yaml"))
    data.update(root="/where/it/was/trained", batch_size=32, crop_size=CROP, std=True, flip=flip)
    torch.manual_seed(seed)
    model = AlexNet(10, crop_size=CROP, **MODEL)
    state = {"model": model.state_dict(), "optimizer": {}, "schedule": {}, "epoch": 1, "step": 1, "rng": [],
             "loader": [], "config": {"data": data, "model": MODEL}, "metrics": {}}  # fmt: skip
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    # trained with mirroring (ten patches at test time) and without (five)
    return [make_checkpoint(folder / f"model{seed}.pt", seed, flip) for seed, flip in ((1, True), (2, False))]


def reference_logits(root: Path, checkpoint: Path, used: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, patches, C) logits and (N,) labels: numpy crops of OpenCV-decoded val images, the model by hand.
    Ten patches (centre, four corners, then mirrored) for a model trained with mirroring, else the first five."""
    stats = PixelStats.load(root)
    mean, std = stats.mean_image, np.sqrt(np.diag(stats.cov))
    size = int(read_meta(root)["settings"]["image_size"])
    far, mid = size - CROP, (size - CROP) // 2
    corners = [(mid, mid), (0, 0), (far, 0), (0, far), (far, far)]  # the centre first, then the corners
    images, labels = [], []
    for path in shard_paths(root, "val"):
        for sample in tarfile_samples([{"url": str(path)}]):
            bgr = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
            centred = (cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB) - mean) / std
            patches = [centred[y : y + CROP, x : x + CROP] for x, y in corners]
            patches += [patch[:, ::-1] for patch in patches]
            images.append(np.stack(patches).transpose(0, 3, 1, 2))
            labels.append(int(sample["cls"]))
    state = torch.load(checkpoint, weights_only=False)
    model = AlexNet(10, crop_size=CROP, **MODEL)
    model.load_state_dict(state["model"])
    used = used or (10 if state["config"]["data"]["flip"] else 5)
    with torch.no_grad():
        x = torch.from_numpy(np.stack(images)[:, :used]).float()
        logits = model.eval()(x.flatten(0, 1)).view(*x.shape[:2], -1)
    return logits.numpy().astype(np.float64), np.asarray(labels)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def numpy_errors(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Top-1 and top-5 error by sorting each row."""
    ranked = np.argsort(-scores, axis=1)
    return 1 - np.mean(ranked[:, 0] == labels), 1 - np.mean((ranked[:, :5] == labels[:, None]).any(axis=1))


def expected(logit_sets: list[np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """The evaluation result from each model's logits: softmax averaged over models (and, ten-crop, crops)."""
    centre = np.mean([softmax(logits[:, 0]) for logits in logit_sets], axis=0)
    tencrop = np.mean([softmax(logits).mean(axis=1) for logits in logit_sets], axis=0)
    (top1, top5), (t1, t5) = numpy_errors(centre, labels), numpy_errors(tencrop, labels)
    return {"top1_err": top1, "top5_err": top5, "tencrop_top1_err": t1, "tencrop_top5_err": t5}


def config(checkpoint: str, root: Path, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "evaluate.yaml"))
    cfg.pop("hydra"), cfg.pop("defaults")
    cfg.update(checkpoint=checkpoint, batch_size=16, **overrides)
    cfg["data"].update(root=str(root), threads=1)
    return cfg


def assert_result(result: dict, reference: dict[str, float], count: int) -> None:
    assert result["count"] == count
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_one_model_equals_numpy(shard_root: Path, checkpoints: list[Path], tmp_path: Path) -> None:
    logits, labels = reference_logits(shard_root, checkpoints[0])
    out = tmp_path / "sub" / "eval.json"
    result = run(config(str(checkpoints[0]), shard_root, out=str(out)))
    reference = expected([logits], labels)
    assert_result(result, reference, len(labels))
    assert json.loads(out.read_text())["top1_err"] == result["top1_err"]
    # the ten-crop average is not the centre crop: a test that would catch a pass with only one patch
    assert not np.allclose(softmax(logits).mean(axis=1), softmax(logits[:, 0]))


def test_centre_only(shard_root: Path, checkpoints: list[Path]) -> None:
    logits, labels = reference_logits(shard_root, checkpoints[0])
    result = run(config(str(checkpoints[0]), shard_root, tencrop=False))
    top1, top5 = numpy_errors(softmax(logits[:, 0]), labels)
    assert result["top1_err"] == pytest.approx(top1) and result["top5_err"] == pytest.approx(top5)
    assert result["tencrop_top1_err"] is None


def test_ensemble_on_two_ranks_from_the_command_line(shard_root: Path, checkpoints: list[Path], tmp_path: Path) -> None:
    """``checkpoint=a,b`` averages the two models' softmax outputs; devices=2 counts each sample once."""
    sets = [reference_logits(shard_root, path) for path in checkpoints]
    labels = sets[0][1]
    out = tmp_path / "ensemble.json"
    # the second as in a run folder of train.main with two overrides: a comma and '=' in the path
    second = tmp_path / "optim.lr=0.1,trainer.max_epochs=5" / "checkpoints" / "best.pt"
    second.parent.mkdir(parents=True)
    state = torch.load(checkpoints[1], weights_only=False)
    save_checkpoint(second, state | {"image_size": 128})  # as if trained on 128 px shards: a warning, not an error
    command = [sys.executable, "-m", "train.evaluate", f"checkpoint={checkpoints[0]},{second}"]
    command += [f"data.root={shard_root}", "data.threads=1", "devices=2", "batch_size=16", f"out={out}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("warning: ") == 1 and "was trained on 128px shards, data.root holds 80px" in done.stderr
    result = json.loads(out.read_text())
    assert_result(result, expected([logits for logits, _ in sets], labels), len(labels))
    assert [per_model["patches"] for per_model in result["per_model"]] == [10, 5]
    for per_model, (logits, _) in zip(result["per_model"], sets, strict=True):
        assert_result(per_model | {"count": len(labels)}, expected([logits], labels), len(labels))
    assert "ensemble of 2" in done.stdout and done.stdout.strip().splitlines()[-1].startswith("top-1 error")


def test_mirror_true_adds_the_mirrored_patches(shard_root: Path, checkpoints: list[Path]) -> None:
    logits, labels = reference_logits(shard_root, checkpoints[1], used=10)  # trained without mirroring
    result = run(config(str(checkpoints[1]), shard_root, mirror=True))
    assert result["per_model"][0]["patches"] == 10
    assert_result(result, expected([logits], labels), len(labels))


def test_two_ranks_equal_one(shard_root: Path, checkpoints: list[Path]) -> None:
    one = run(config(str(checkpoints[1]), shard_root, devices=1))
    two = run(config(str(checkpoints[1]), shard_root, devices=2))
    keys = ("top1_err", "top5_err", "tencrop_top1_err", "tencrop_top5_err", "count")
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys}


@pytest.mark.parametrize(
    "args, message",
    [
        (["checkpoint=/no/such/model.pt"], "/no/such/model.pt does not exist"),
        (["checkpoint={ckpt}", "data.root=/no/such/shards"], "/no/such/shards does not exist"),
        (["checkpoint={ckpt}", "batch_size=3", "devices=2"], "batch_size=3"),
        (["checkpoint={ckpt}", "bogus=1"], "bogus"),
        (["checkpoint={ckpt}", "mirror=maybe"], "mirror='maybe' is unknown"),
    ],
    ids=["missing-checkpoint", "missing-data", "batch", "unknown-key", "mirror"],
)
def test_bad_input_is_one_line_and_exit_2(shard_root: Path, checkpoints: list[Path], args: list, message: str) -> None:
    args = [arg.format(ckpt=checkpoints[0]) for arg in args]
    if not any(arg.startswith("data.root=") for arg in args):
        args.append(f"data.root={shard_root}")
    done = subprocess.run(
        [sys.executable, "-m", "train.evaluate", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr


def test_checkpoint_of_other_data_is_one_line(shard_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "hundred.pt"
    make_checkpoint(path, 0, flip=True)
    state = torch.load(path, weights_only=False)
    state["model"] = AlexNet(100, crop_size=CROP, **MODEL).state_dict()
    save_checkpoint(path, state)
    done = subprocess.run(
        [sys.executable, "-m", "train.evaluate", f"checkpoint={path}", f"data.root={shard_root}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2 and "does not fit the data" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    )


def test_checkpoint_lists(tmp_path: Path) -> None:
    assert split_paths("a.pt, b.pt,") == ["a.pt", "b.pt"]
    assert split_paths(["a.pt", "b.pt,c.pt"]) == ["a.pt", "b.pt", "c.pt"]
    run_dir = tmp_path / "x=1,y=2,z=3"
    run_dir.mkdir()
    (run_dir / "best.pt").touch()
    (tmp_path / "x=1").mkdir()  # a folder named like the first piece does not stop the join
    inside = str(run_dir / "best.pt")
    assert split_paths(f"{inside},{inside}, missing.pt") == [inside, inside, "missing.pt"]
    assert split_paths(str(run_dir)) == [str(run_dir)]  # the folder whole, so the error can name the file inside


def test_path_values_are_quoted_for_hydra() -> None:
    keys = ("checkpoint", "out")
    argv = ["checkpoint=a.pt,b.pt", "x=1,2", "checkpoint='c,d'", "out=runs/lr=0.1/e.json", "out=plain.json"]
    argv += ["checkpoint=[a.pt,b.pt]", "out=choice(a,b)"]
    assert quote_paths(argv, keys) == [
        "checkpoint='a.pt,b.pt'",
        "x=1,2",  # not a path key: a sweep stays a sweep
        "checkpoint='c,d'",
        "out='runs/lr=0.1/e.json'",
        "out='plain.json'",
        "checkpoint=[a.pt,b.pt]",  # Hydra's own list and sweep syntax is left to Hydra
        "out=choice(a,b)",
    ]


def test_help_lists_its_options_not_the_trainers_config_groups() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "train.evaluate", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "tencrop: true" in done.stdout and "mirror: auto" in done.stdout, done.stderr
    assert "experiment" not in done.stdout and "Configuration groups" not in done.stdout


def test_summary_names_the_patches_every_model_averaged() -> None:
    assert multi_crop_name([10, 10]) == "ten-crop"
    assert multi_crop_name([5]) == "five-crop (no mirrored patches)"
    assert multi_crop_name([10, 5]) == "multi-crop (10/5 patches per model)"  # not "ten-crop" for a mixed ensemble
