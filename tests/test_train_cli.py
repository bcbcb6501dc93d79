"""``python -m train.main`` as users run it: real worker processes (gloo), real DALI pipelines on the digits
shards, Hydra sweeps, signals, and the one-line errors of bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.loader import build_loader
from preprocess.shard_format import STATS_FILE
from train.checkpoint import REQUIRED_KEYS, load_checkpoint
from train.model import AlexNet

TEST_CROP = 64  # conftest.TEST_CROP: the 80 px digits shards with the AlexNet geometry
SMALL = [
    f"data.crop_size={TEST_CROP}",
    "data.batch_size=16",
    "model.width=0.25",
    "model.init=kaiming",
    "data.std=true",
    "trainer.progress=false",
]
STEP_KEYS = {"kind", "epoch", "step", "lr", "loss", "train_top1_err", "images_per_sec", "data_wait"}
EPOCH_KEYS = STEP_KEYS | {"val_top1_err", "val_top5_err", "seconds"}
SUMMARY_KEYS = {
    "val_top1_err",
    "val_top5_err",
    "tencrop_top1_err",
    "tencrop_top5_err",
    "best_val_top1_err",
    "epochs",
    "wall_seconds",
    "images_per_sec",
}


def command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "train.main", *overrides]


def train(cwd: Path, *overrides: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command(*overrides), cwd=cwd, capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def two_rank_overrides(shard_root: Path, run_dir: Path) -> list[str]:
    return [
        f"data.root={shard_root}",
        *SMALL,
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "trainer.log_every=1",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.fixture(scope="module")
def reference_run(shard_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two gloo ranks, 2 epochs of 10 steps, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = train(run_dir.parent, *two_rank_overrides(shard_root, run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def error_rates(model: torch.nn.Module, shard_root: Path, mode: str) -> tuple[float, float]:
    """Top-1/top-5 error of ``model`` over the whole val split, one process, counted with numpy."""
    data = {"root": str(shard_root), "crop_size": TEST_CROP, "batch_size": 7, "std": True}  # as SMALL
    wrong1 = wrong5 = total = 0
    with torch.no_grad():
        for images, labels in build_loader(data, "val", mode):
            if mode == "tencrop":
                logits = model(images.flatten(0, 1)).view(*images.shape[:2], -1).numpy().astype(np.float64)
                probs = np.exp(logits - logits.max(-1, keepdims=True))
                scores = (probs / probs.sum(-1, keepdims=True)).mean(1)
            else:
                scores = model(images).numpy()
            ranked = np.argsort(-scores, axis=1)
            labels = labels.numpy()[:, None]
            wrong1 += int((ranked[:, :1] != labels).all(1).sum())
            wrong5 += int((ranked[:, :5] != labels).all(1).sum())
            total += len(labels)
    return wrong1 / total, wrong5 / total


def tensorboard_steps(run_dir: Path) -> dict[str, list[int]]:
    """The steps of each scalar as TensorBoard shows them (events after a purge step dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [event.step for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_two_rank_training_writes_every_output(reference_run: Path, shard_root: Path) -> None:
    steps, epochs = records(reference_run, "step"), records(reference_run, "epoch")
    assert [r["step"] for r in steps] == list(range(1, 21))  # 160 train images, 16 a step: 10 steps an epoch
    assert all(set(r) == STEP_KEYS for r in steps) and all(set(r) == EPOCH_KEYS for r in epochs)
    assert [r["epoch"] for r in epochs] == [1, 2] and [r["step"] for r in epochs] == [10, 20]
    assert all(np.isfinite(r["loss"]) and 0 <= r["data_wait"] <= 1 and r["images_per_sec"] > 0 for r in steps)
    # the epoch loss is the mean of its steps' losses (equal batches): the logging adds up what it should
    for epoch in epochs:
        mine = [r["loss"] for r in steps if r["epoch"] == epoch["epoch"]]
        assert epoch["loss"] == pytest.approx(np.mean(mine), rel=1e-9)
    assert epochs[-1]["loss"] < epochs[0]["loss"]

    summary = json.loads((reference_run / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["epochs"] == 2
    assert summary["best_val_top1_err"] == min(r["val_top1_err"] for r in epochs)
    assert list((reference_run / "tensorboard").glob("events.out.tfevents.*"))

    checkpoint = load_checkpoint(reference_run / "checkpoints" / "last.pt")
    assert set(REQUIRED_KEYS) <= set(checkpoint) and (checkpoint["epoch"], checkpoint["step"]) == (2, 20)
    assert len(checkpoint["loader"]) == len(checkpoint["rng"]) == 2
    assert checkpoint["config"]["data"]["root"] == str(shard_root)  # resolved, plain
    assert checkpoint["image_size"] == 80  # of the shards it trained on (conftest.SHARD_IMAGE_SIZE)
    assert (reference_run / "checkpoints" / "best.pt").is_file()

    # the errors the ranks counted together equal one process's count over the same weights
    model = AlexNet(10, crop_size=TEST_CROP, **checkpoint["config"]["model"]).eval()
    model.load_state_dict(checkpoint["model"])
    assert (summary["val_top1_err"], summary["val_top5_err"]) == pytest.approx(error_rates(model, shard_root, "center"))
    assert (summary["tencrop_top1_err"], summary["tencrop_top5_err"]) == pytest.approx(
        error_rates(model, shard_root, "tencrop")
    )


def interrupt_after_first_log_line(
    argv: list[str], cwd: Path, run_dir: Path, signum: int, group: bool = False, env: dict | None = None
) -> tuple[int, str, str]:
    """Start a train.main command, send ``signum`` once its first metrics line is written (mid-epoch):
    (status, out, err). ``group``: to every process of the command, as a terminal's Ctrl-C."""
    process = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=group, env=env
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


SLOW_MID_EPOCH_SAVE = """
import time
import train.checkpoint

save = train.checkpoint.save_checkpoint


def slow_save(path, checkpoint):  # a slow disk: longer than the launcher's grace for ranks still running
    if checkpoint["step_in_epoch"]:
        time.sleep(12)
    save(path, checkpoint)


train.checkpoint.save_checkpoint = slow_save
"""


def test_sigterm_saves_and_resume_ends_with_the_same_weights(reference_run: Path, shard_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    overrides = two_rank_overrides(shard_root, run_dir)
    # every process of the interrupted run, the spawned ranks included, loads this sitecustomize first
    (tmp_path / "slow_disk").mkdir()
    (tmp_path / "slow_disk" / "sitecustomize.py").write_text(SLOW_MID_EPOCH_SAVE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "slow_disk"), *sys.path])}
    returncode, _, stderr = interrupt_after_first_log_line(
        command(*overrides, "trainer.resume=never"), tmp_path, run_dir, signal.SIGTERM, env=env
    )
    assert returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    # that command would start afresh if run again: the message names the setting that resumes instead
    assert f"run the command with trainer.resume={run_dir / 'checkpoints' / 'last.pt'} to resume" in stderr, stderr
    interrupted = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert interrupted["step"] < 20 and interrupted["step_in_epoch"] > 0  # stopped mid-epoch, at a step boundary

    resumed = train(tmp_path, *overrides)  # the same command: trainer.resume=auto finds last.pt
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    final, reference = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run_dir, reference_run))
    assert final["step"] == reference["step"] == 20
    for name, tensor in reference["model"].items():
        assert torch.equal(final["model"][name], tensor), name
    # metrics.jsonl reads as one run: every step once, the same losses as the uninterrupted run
    assert [r["step"] for r in records(run_dir, "step")] == list(range(1, 21))
    assert [r["loss"] for r in records(run_dir, "epoch")] == [r["loss"] for r in records(reference_run, "epoch")]
    # so does TensorBoard: the resume purges only what came after the checkpoint's step
    scalars = tensorboard_steps(run_dir)
    assert scalars["step/loss"] == list(range(1, 21)) and scalars["epoch/val_top1_err"] == [10, 20]


SUBMITIT_LIKE_JOB = """
import runpy, signal, sys
from pathlib import Path

checkpoint = Path(sys.argv[1])


def requeue(signum, frame):  # what submitit installs for its preemption signal: requeue the job, then exit
    print(f"requeued; checkpoint on disk: {checkpoint.is_file()}", flush=True)
    sys.exit(3)


signal.signal(signal.SIGUSR2, requeue)
sys.argv = ["train.main", *sys.argv[2:]]
runpy.run_module("train.main", run_name="__main__", alter_sys=True)
"""


def test_submitits_preemption_signal_saves_before_its_requeue_handler_runs(shard_root: Path, tmp_path: Path) -> None:
    """SLURM warns a job before preemption or its time limit; submitit asks for SIGUSR2 and requeues the job from its
    own handler. The ranks save a mid-epoch checkpoint first, then that handler still runs."""
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.pt"
    argv = [sys.executable, "-c", SUBMITIT_LIKE_JOB, str(checkpoint), *two_rank_overrides(shard_root, run_dir)]
    returncode, stdout, stderr = interrupt_after_first_log_line(argv, tmp_path, run_dir, signal.SIGUSR2)
    assert returncode == 3, stderr
    assert "requeued; checkpoint on disk: True" in stdout, stdout
    interrupted = load_checkpoint(checkpoint)
    assert interrupted["step"] < 20 and interrupted["step_in_epoch"] > 0


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's new parent may be slow to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_ranks_whose_launcher_is_killed_save_and_stop(shard_root: Path, tmp_path: Path) -> None:
    """SIGKILL (or the OOM killer) of the launching process: its ranks must not train on unwatched."""
    run_dir = tmp_path / "run"
    longer = [o.replace("max_epochs=2", "max_epochs=6") for o in two_rank_overrides(shard_root, run_dir)]
    launcher = subprocess.Popen(
        command(*longer),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    children = [int(pid) for pid in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
    assert len(children) >= 2  # the two ranks (and multiprocessing's resource tracker)
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while any(map(running, children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, children))
    interrupted = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert interrupted["step"] < 60  # they saved at their next log point (or the epoch's end) and stopped


def test_ctrl_c_with_one_device_saves_and_the_same_command_resumes(shard_root: Path, tmp_path: Path) -> None:
    """One device runs its rank in the launching process, where Ctrl-C lands: a graceful stop, not a traceback.
    With the torch loader's worker processes, which get the terminal's Ctrl-C too."""
    run_dir = tmp_path / "run"
    one_device = {"trainer.devices=2": "trainer.devices=1"}
    overrides = [one_device.get(o, o) for o in two_rank_overrides(shard_root, run_dir)]
    overrides += ["data.loader=torch", "data.threads=2"]
    returncode, stdout, stderr = interrupt_after_first_log_line(
        command(*overrides), tmp_path, run_dir, signal.SIGINT, True
    )
    assert returncode == 128 + signal.SIGINT, stderr
    assert stderr.strip().count("\n") == 0 and "stopped by SIGINT" in stderr, stderr
    assert stdout.count("Ctrl-C again") == 1, stdout  # said by the trainer, not by each loader worker
    interrupted = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert interrupted["step"] < 20 and interrupted["step_in_epoch"] > 0

    resumed = train(tmp_path, *overrides)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 20
    assert [r["step"] for r in records(run_dir, "step")] == list(range(1, 21))


def test_a_refused_command_leaves_no_run_folder_behind(shard_root: Path, tmp_path: Path) -> None:
    (tmp_path / "outputs" / "default" / "earlier").mkdir(parents=True)  # someone else's folder stays
    refused = train(tmp_path, f"data.root={shard_root}", "data.flip=no")
    assert refused.returncode == 2 and "data.flip='no'" in refused.stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "outputs",
        "outputs/default",
        "outputs/default/earlier",
    ]
    assert train(tmp_path, "data.root=/no/such/shards").returncode == 2
    assert not (tmp_path / "outputs" / "default" / "default").exists()
    (tmp_path / "mine").mkdir()  # a folder the user named keeps existing, without Hydra's files
    assert train(tmp_path, "data.root=/no/such/shards", f"hydra.run.dir={tmp_path / 'mine'}").returncode == 2
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_resume_refuses_other_settings_or_other_data_but_not_moved_data(
    reference_run: Path, shard_root: Path, tmp_path: Path
) -> None:
    run_dir = shutil.copytree(reference_run, tmp_path / "run")
    overrides = two_rank_overrides(shard_root, run_dir)

    def resume(*extra: str, root: Path = shard_root) -> subprocess.CompletedProcess:
        return train(tmp_path, *[o for o in overrides if not o.startswith("data.root=")], f"data.root={root}", *extra)

    other = shutil.copytree(shard_root, tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    meta["settings"]["seed"] = 1  # as if built with another shuffle
    (other / "meta.json").write_text(json.dumps(meta))
    for result, expected in (
        (resume("optim.lr=0.001"), "optim.lr=0.01 -> 0.001"),
        (resume(root=other), "other shards"),
    ):
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
    moved = resume(root=shutil.copytree(shard_root, tmp_path / "moved"))
    assert moved.returncode == 0 and "training is complete (2 epochs)" in moved.stdout, moved.stderr
    one_device = resume("trainer.devices=1")  # a finished run is only evaluated again, by any number of ranks
    assert one_device.returncode == 0 and "training is complete" in one_device.stdout, one_device.stderr
    longer = resume("trainer.devices=1", "trainer.max_epochs=3")  # but training on needs its own ranks
    assert longer.returncode == 2 and "use trainer.devices=2" in longer.stderr, longer.stderr


def test_torchrun_ranks_train_exactly_like_spawned_ones(reference_run: Path, shard_root: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = [o for o in two_rank_overrides(shard_root, run_dir) if not o.startswith("trainer.devices")]
    result = subprocess.run(
        [*torchrun, "-m", "train.main", *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    final, reference = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run_dir, reference_run))
    assert len(final["loader"]) == 2 and final["step"] == reference["step"]
    assert all(torch.equal(final["model"][name], tensor) for name, tensor in reference["model"].items())


def test_sweep_runs_each_job_with_its_own_summary(shard_root: Path, tmp_path: Path) -> None:
    result = train(
        tmp_path,
        "-m",
        f"data.root={shard_root}",
        *SMALL,
        "trainer.max_epochs=1",
        "trainer.tencrop=false",
        "optim.lr=0.01,0.005",
        "trainer.devices=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert result.returncode == 0, result.stderr
    summaries = {
        d.name: json.loads((d / "summary.json").read_text()) for d in (tmp_path / "sweep").iterdir() if d.is_dir()
    }
    # one dir per override set, named by the overrides (so a re-run resumes each job); where the data is and
    # whether the bar shows change nothing in the result and are left out of the name; the rank count stays in
    assert len(summaries) == 2 and all(s["epochs"] == 1 for s in summaries.values())
    assert all("data.root" not in name and "trainer.progress" not in name for name in summaries)
    assert all("trainer.devices=1" in name for name in summaries)
    lrs = {
        next(part for part in name.split(",") if part.startswith("optim.lr=")): records(
            tmp_path / "sweep" / name, "step"
        )[0]["lr"]
        for name in summaries
    }
    assert lrs == {"optim.lr=0.01": 0.01, "optim.lr=0.005": 0.005}


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(shard_root: Path, tmp_path: Path) -> None:
    # lr 1e-3 in epoch 1, then 1e-3 * 1e7 from epoch 2: the loss explodes in epoch 2
    result = train(
        tmp_path,
        f"data.root={shard_root}",
        *SMALL,
        "trainer.max_epochs=2",
        "trainer.log_every=1",
        "optim.lr=0.001",
        "schedule=step",
        "schedule.step_epochs=1",
        "schedule.factor=1e7",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "NaN or infinite" in lines[0] and "last good checkpoint" in lines[0]
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert kept["epoch"] == 1 and all(torch.isfinite(t).all() for t in kept["model"].values())


def corrupt_stats(shard_root: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shard_root, copy)
    with np.load(copy / STATS_FILE) as data:
        stats = dict(data)
    stats["mean_image"] = stats["mean_image"][:40, :40]  # stats of other shards (40 px, these are 80 px)
    np.savez(copy / STATS_FILE, **stats)
    return copy


def corrupt_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"\x00" * 100)


BAD_INPUTS = {
    "root-not-set": (lambda root, tmp: [], "data.root is not set"),
    "root-missing": (lambda root, tmp: [f"data.root={tmp / 'nowhere'}"], "does not exist"),
    "root-empty": (lambda root, tmp: (tmp / "empty").mkdir() or [f"data.root={tmp / 'empty'}"], "meta.json"),
    "stats-mismatch": (lambda root, tmp: [f"data.root={corrupt_stats(root, tmp)}"], "stats"),
    "unknown-key": (lambda root, tmp: [f"data.root={root}", "trainer.fast=true"], "trainer.fast"),
    "corrupt-checkpoint": (lambda root, tmp: corrupt_checkpoint(tmp) or [f"data.root={root}"], "last.pt"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_code_2(case: str, shard_root: Path, tmp_path: Path) -> None:
    make, expected = BAD_INPUTS[case]
    result = train(tmp_path, *SMALL, *make(shard_root, tmp_path), f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
