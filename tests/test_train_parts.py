"""The trainer's parts on their own: the launcher's real worker processes, checkpoint files, metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tqdm import tqdm

from preprocess.cli import one_line
from train.checkpoint import REQUIRED_KEYS, CheckpointError, load_checkpoint, resume_conflicts, save_checkpoint
from train.distributed import StopRun, cuda_index, launch
from train.runlog import format_epoch_line, truncate_after

REPO = Path(__file__).resolve().parents[1]

# ---- workers for launch() (module level: spawned children import them by name) ----------------------------


def sum_of_ranks(rank: int, world_size: int, offset: int) -> tuple[int, float]:
    value = torch.tensor([float(rank + offset)])
    dist.all_reduce(value)
    return world_size, value.item()


def large_result(rank: int, world_size: int, size: int) -> bytes:
    dist.barrier()
    return bytes(range(256)) * (size // 256)


def rank_one_dies(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(7)  # dies without a word, as an OOM-killed process would
    time.sleep(120)  # rank 0 is busy elsewhere: only the parent can end it


def rank_one_stops(rank: int, world_size: int) -> None:
    dist.barrier()
    if rank == 1:
        raise StopRun("data.root=/nowhere does not exist", 2)
    dist.barrier()  # rank 0 waits for a partner that is gone


def killed_by_sigterm_after_a_progress_bar(rank: int, world_size: int) -> None:
    """As an evaluation rank when the parent forwards a Ctrl-C: no SIGTERM handler, so the signal kills it."""
    tqdm(total=1, disable=rank != 0).close()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)


def finishes_despite_a_ctrl_c(rank: int, world_size: int, parent: int) -> str:
    signal.signal(signal.SIGTERM, lambda *_: None)  # as a trainer past its last log point: nothing left to stop
    if rank == 0:
        os.kill(parent, signal.SIGINT)  # the user's Ctrl-C, which the parent forwards as SIGTERM
    time.sleep(1.0)
    return "finished"


def stops_on_sigterm(rank: int, world_size: int, parent: int) -> None:
    """As the trainer: a SIGTERM is acted on at the next log point, ending the run with a StopRun naming it."""
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stopped.append(signum))
    if rank == 0:
        os.kill(parent, signal.SIGINT)  # the user's Ctrl-C, which the parent forwards as SIGTERM
    deadline = time.monotonic() + 30
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    raise StopRun("stopped by SIGTERM at epoch 1, step 3: checkpoint saved", 128 + signal.SIGTERM)


def test_a_ctrl_c_the_workers_got_as_sigterm_is_reported_as_the_ctrl_c(capsys) -> None:
    with pytest.raises(StopRun) as stop:
        launch(stops_on_sigterm, 2, os.getpid(), timeout_s=60)
    assert stop.value.exit_code == 128 + signal.SIGINT
    assert str(stop.value) == "stopped by SIGINT (Ctrl-C) at epoch 1, step 3: checkpoint saved"
    assert capsys.readouterr().out.count("Ctrl-C: asking the workers to stop") == 1


def test_launch_returns_rank0_result_of_a_real_all_reduce() -> None:
    assert launch(sum_of_ranks, 2, 10, timeout_s=60) == (2, 10.0 + 11.0)
    assert launch(sum_of_ranks, 1, 10, timeout_s=60) == (1, 10.0)
    assert "RANK" not in os.environ  # the in-process run leaves no torchrun variables behind for the next job


def test_a_result_larger_than_a_pipe_buffer_comes_back() -> None:
    # a spawned rank's result travels through a pipe (64 KiB buffer): it must be read while the rank runs
    assert launch(large_result, 2, 4 << 20, timeout_s=60) == bytes(range(256)) * (16 << 10)


def test_a_dead_worker_stops_the_others_in_bounded_time() -> None:
    started = time.monotonic()
    with pytest.raises(StopRun, match=r"rank 1 exited with status 7") as caught:
        launch(rank_one_dies, 2, grace_s=2.0, timeout_s=60)
    assert caught.value.exit_code == 1
    assert time.monotonic() - started < 20  # rank 0 would have slept 120 s


def test_a_ctrl_c_the_workers_outlived_ends_the_command() -> None:
    """A sweep must not start its next job after a Ctrl-C, even when the workers finished instead of stopping."""
    with pytest.raises(KeyboardInterrupt):
        launch(finishes_despite_a_ctrl_c, 2, os.getpid(), grace_s=2.0, timeout_s=60)


def test_a_rank_killed_by_sigterm_leaves_no_semaphore_behind() -> None:
    """tqdm's default lock is a semaphore that a killed rank cannot release: Python's resource tracker then warned
    'There appear to be 2 leaked semaphore objects' after a Ctrl-C of a two-rank evaluation."""
    script = (
        "from test_train_parts import killed_by_sigterm_after_a_progress_bar as worker\n"
        "from train.distributed import StopRun, launch\n"
        "try:\n    launch(worker, 2, timeout_s=60)\nexcept StopRun as stop:\n    print(stop)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert "killed by SIGTERM" in done.stdout, done.stdout + done.stderr
    assert "leaked semaphore" not in done.stderr


def test_stop_run_reaches_the_parent_with_its_message_and_code() -> None:
    with pytest.raises(StopRun, match="data.root=/nowhere does not exist") as caught:
        launch(rank_one_stops, 2, grace_s=2.0, timeout_s=60)
    assert caught.value.exit_code == 2


# ---- checkpoints -------------------------------------------------------------------------------------------


def full_state() -> dict:
    state = {key: {} for key in REQUIRED_KEYS}
    state["model"] = {"w": torch.arange(6.0).reshape(2, 3)}
    state["epoch"], state["step"] = 3, 42
    return state


def test_checkpoint_round_trip_is_atomic(tmp_path) -> None:
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, full_state())
    save_checkpoint(path, full_state())  # replacing an existing file
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    with pytest.raises(AttributeError):  # a write that fails midway (here: an object pickle refuses)
        save_checkpoint(path, {**full_state(), "hook": lambda: None})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # still only the previous, whole file
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert (loaded["epoch"], loaded["step"]) == (3, 42)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing-keys", "absent"])
def test_unusable_checkpoints_give_one_line(tmp_path, damage: str) -> None:
    path = tmp_path / "last.pt"
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif damage == "truncated":
        save_checkpoint(path, full_state())
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "missing-keys":
        torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    if damage != "absent":  # the fix fits who named the file: the user (evaluate), or the trainer resuming
        assert "trainer.resume" not in message and "checkpoints/best.pt" in message
        with pytest.raises(CheckpointError, match="delete it to start afresh|delete it"):
            load_checkpoint(path, resuming=True)


def run_config(schedule: str = "plateau", max_epochs: int = 90, seed: int = 0, root: str = "/a") -> dict:
    return {
        "data": {"root": root, "batch_size": 128},
        "optim": {"lr": 0.01},
        "schedule": {"name": schedule},
        "model": {"width": 1.0},
        "trainer": {"max_epochs": max_epochs, "seed": seed, "devices": 2, "log_every": 50},
    }


def test_resume_conflicts_are_the_settings_that_change_a_run_in_progress() -> None:
    assert resume_conflicts(run_config(), run_config(max_epochs=120, root="/moved")) == []  # train on, moved data
    assert resume_conflicts(run_config(), run_config(seed=1)) == ["trainer.seed=0 -> 1"]
    # a cosine curve spans max_epochs: lengthening it mid-run would send the lr back up
    assert resume_conflicts(run_config("cosine"), run_config("cosine", max_epochs=120)) == [
        "trainer.max_epochs=90 -> 120"
    ]
    assert resume_conflicts(run_config(), run_config("cosine")) == ["schedule.name='plateau' -> 'cosine'"]


def test_a_run_folder_as_checkpoint_names_the_file_in_it(tmp_path) -> None:
    save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt", full_state())
    with pytest.raises(CheckpointError, match=f"is a folder: did you mean {tmp_path}/run/checkpoints/best.pt"):
        load_checkpoint(tmp_path / "run")


# ---- metrics.jsonl and console -----------------------------------------------------------------------------


def test_truncate_after_drops_lines_past_the_checkpoint(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"kind": "step", "step": s}) + "\n" for s in (2, 4, 6, 8)))
    truncate_after(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]


def test_epoch_line_shows_percentages() -> None:
    record = dict(
        epoch=3,
        loss=1.23456,
        train_top1_err=0.5,
        val_top1_err=0.25,
        val_top5_err=0.125,
        lr=0.01,
        images_per_sec=1234.4,
        data_wait=0.031,
        seconds=12.34,
    )
    line = format_epoch_line(record, 90)
    assert line.startswith("epoch 3/90 | loss 1.2346 | train err 50.00%")
    assert "top-1 25.00% top-5 12.50%" in line and "1234 img/s" in line and "data wait 3.1%" in line


def test_each_rank_gets_its_own_gpu_or_the_one_it_sees() -> None:
    assert [cuda_index(rank, 4) for rank in range(4)] == [0, 1, 2, 3]  # one process per GPU of the node
    assert cuda_index(3, 1) == 0  # a launcher showing each rank one GPU (CUDA_VISIBLE_DEVICES per task)
    with pytest.raises(StopRun, match="local rank 2 sees 2 GPUs") as stop:
        cuda_index(2, 2)
    assert stop.value.exit_code == 2


def test_one_line_joins_message_and_cause() -> None:
    try:
        try:
            raise RuntimeError("Key 'foo' is not in struct\n    full_key: trainer.foo")
        except RuntimeError as cause:
            raise ValueError("Could not override 'trainer.foo'.\nTo append use +trainer.foo=1") from cause
    except ValueError as err:
        assert one_line(err) == (
            "Could not override 'trainer.foo'. To append use +trainer.foo=1 (Key 'foo' is not in struct)"
        )


def test_resume_drops_metrics_lines_past_the_checkpoint_and_a_torn_last_line(tmp_path) -> None:
    from train.runlog import truncate_after

    path = tmp_path / "metrics.jsonl"
    kept = [json.dumps({"kind": "step", "step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    later = json.dumps({"kind": "step", "step": 4, "loss": 0.25})
    path.write_text("\n".join([*kept, later]) + '\n{"kind": "step", "st')  # killed while writing step 5
    truncate_after(path, 3)
    assert path.read_text().splitlines() == kept


# ---- stop signals ------------------------------------------------------------------------------------------------

CTRL_C_DRIVER = """
import os, signal, sys
from train.loop import catching_stop_signals
mode = sys.argv[1]
try:
    with catching_stop_signals() as stop:
        if mode == "done":
            stop.training_done = True
        os.kill(os.getpid(), signal.SIGINT)
        print("recorded", stop.signum, flush=True)
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C
        print("not reached", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_is_recorded_once_then_interrupts() -> None:
    """First Ctrl-C: recorded for the next log point; the second (or any once training is done): at once."""
    run = [sys.executable, "-c", CTRL_C_DRIVER]
    during = subprocess.run([*run, "training"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert f"recorded {int(signal.SIGINT)}\ninterrupted\n" in during.stdout, during.stderr
    assert during.stdout.count("Ctrl-C: stopping at the next log point") == 1
    after = subprocess.run([*run, "done"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert after.stdout == "interrupted\n", after.stderr


def test_a_ctrl_c_not_acted_on_ends_the_command() -> None:
    """Recorded but never reached a log point (it came after the last one): an interrupt when the worker returns,
    so a sweep stops instead of running its next job."""
    driver = (
        "import os, signal\nfrom train.loop import catching_stop_signals\n"
        "try:\n    with catching_stop_signals():\n        os.kill(os.getpid(), signal.SIGINT)\n"
        "    print('returned')\nexcept KeyboardInterrupt:\n    print('interrupted')\n"
    )
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.stdout.endswith("interrupted\n") and "returned" not in done.stdout, done.stderr
