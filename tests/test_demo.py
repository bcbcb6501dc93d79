"""``python -m train.demo`` and ``preprocess.demo_data`` at their edges (the whole demo takes two minutes and runs
outside the test suite)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# a step that, like train.main, needs a moment after Ctrl-C to save its work, then exits 130
SLOW_TO_STOP_STEP = """
import pathlib, signal, sys, time
def stop(*_):
    time.sleep(1.0)
    pathlib.Path(sys.argv[1]).write_text("saved")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
pathlib.Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


def test_help_and_bad_arguments() -> None:
    shown = subprocess.run([sys.executable, "-m", "train.demo", "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and "python -m train.demo" in shown.stdout
    bad = subprocess.run([sys.executable, "-m", "train.demo", "epochs=3"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "out=DIR" in bad.stderr


def test_each_rank_count_trains_its_own_demo_run() -> None:
    from train.demo import demo_run_dir

    assert demo_run_dir("2") == Path("outputs/demo/default")  # the experiment's count: the folder the docs name
    assert demo_run_dir("1") == Path("outputs/demo/trainer.devices=1")  # another run, not a resume of that one


def test_ctrl_c_lets_the_running_step_finish_stopping(tmp_path: Path) -> None:
    saved, ready = tmp_path / "saved", tmp_path / "ready"
    step = [sys.executable, "-c", SLOW_TO_STOP_STEP, str(saved), str(ready)]
    driver = f"from train.demo import run; run({step!r})"
    demo = subprocess.Popen(
        [sys.executable, "-c", driver],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not ready.is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(demo.pid, signal.SIGINT)  # as a terminal does: the demo and its step both get it
    _, stderr = demo.communicate(timeout=60)
    assert saved.read_text() == "saved"  # the step was not killed while it saved
    assert demo.returncode == 130 and stderr.strip().count("\n") == 0 and "interrupted" in stderr, stderr


def demo_data(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "preprocess.demo_data", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_demo_data_never_mixes_two_draws_in_one_folder(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    first = demo_data(f"out={out}", "limit=30")
    assert first.returncode == 0 and "wrote 24 train and 6 val" in first.stdout, first.stderr
    files = sorted(p.relative_to(out) for p in out.rglob("*.JPEG"))
    assert demo_data(f"out={out}", "limit=30").returncode == 0  # the same draw again (an interrupted run finished)
    other = demo_data(f"out={out}", "limit=30", "seed=1")  # would put some val images into train
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "already holds digits" in other.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*.JPEG")) == files
    assert not list(out.rglob(".*tmp*"))


def test_demo_data_help_and_bad_arguments(tmp_path: Path) -> None:
    shown = demo_data("--help")
    assert shown.returncode == 0 and "python -m preprocess.demo_data out=" in shown.stdout
    for args, message in (
        (["outt=x"], "unknown or missing arguments"),
        ([f"out={tmp_path}/d", "limit=-5"], "limit='-5' must be an integer >= 1"),
        ([f"out={REPO / 'README.md'}/d"], "cannot be written"),
    ):
        bad = demo_data(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and message in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1
