"""``python -m train.demo`` at its edges (the whole demo takes two minutes and runs outside the test suite)."""

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
