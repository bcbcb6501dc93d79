"""Checkpoint files: written atomically, read back with a one-line error when unusable; random-state capture.

A checkpoint (``checkpoints/last.pt``, ``checkpoints/best.pt``) is a dict::

    model       state_dict of the bare model (no DDP ``module.`` prefix, no torch.compile wrapper)
    optimizer   optimizer.state_dict()          schedule   schedule.state_dict()
    epoch       the epoch to run next (0-based); with step_in_epoch > 0, the epoch in progress
    step        optimizer steps done in all       step_in_epoch  steps done in ``epoch``
    rng         per rank: the torch / CUDA / numpy / python random states
    loader      per rank: the training loader's state_dict()
    config      the whole resolved config, a plain dict (config["model"], config["data"], ...)
    dataset     ``shard_format.dataset_fingerprint`` of the training data (a moved folder still matches)
    image_size  the training shards' image size (evaluating on shards of another size changes the scale)
    metrics     {"history": [epoch lines], "best_val_top1_err", "partial": sums of the epoch in progress}

Files are trusted (this project writes them): ``torch.load(weights_only=False)`` restores numpy and python
random states as they were.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preprocess.shard_format import temporary_path

REQUIRED_KEYS = ("model", "optimizer", "schedule", "epoch", "step", "rng", "loader", "config", "metrics")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming the file and the fix."""


RUN_SECTIONS = ("model", "optim", "schedule", "data")  # the settings that make a run what it is (and trainer.seed)
FREE_KEYS = ("data.root", "data.threads", "data.prefetch")  # where the data lies and how fast it is read


def _flatten(config: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    return {key: value for name, item in config.items() for key, value in _flatten(item, f"{prefix}.{name}").items()}


def _run_settings(config: dict[str, Any]) -> dict[str, Any]:
    settings = {
        key: value
        for section in RUN_SECTIONS
        for key, value in _flatten(config.get(section, {}), section).items()
        if key not in FREE_KEYS
    }
    settings["trainer.seed"] = config.get("trainer", {}).get("seed")  # the data order the loader states continue
    return settings


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key=old -> new`` for every setting in which ``current`` differs from the checkpointed run's ``saved``
    config: resuming would silently continue that run (its optimizer state, learning rate and data order)."""
    old, new = _run_settings(saved), _run_settings(current)
    if old.get("schedule.name") == new.get("schedule.name") == "cosine":  # its curve spans max_epochs: more raises lr
        for settings, config in ((old, saved), (new, current)):
            settings["trainer.max_epochs"] = config["trainer"]["max_epochs"]
    return [
        f"{key}={old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename: ``path`` is always whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:  # a full disk or a Ctrl-C mid-write leaves neither a torn file nor its temporary
        tmp.unlink(missing_ok=True)


def copy_checkpoint(src: str | Path, dst: str | Path) -> None:
    """Copy a checkpoint file under a temporary name, then rename (``best.pt`` from ``last.pt``)."""
    dst = Path(dst)
    tmp = temporary_path(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, resuming: bool = False) -> dict[str, Any]:
    """The checkpoint dict at ``path``, on the CPU; ``CheckpointError`` if it is missing, corrupt or incomplete.

    ``resuming``: the trainer's own last.pt, whose fix is to delete it; otherwise a file the user named."""
    path = Path(path)
    fix = (
        "delete it to start afresh, or resume from another file with trainer.resume=PATH"
        if resuming
        else "pass checkpoints/best.pt or last.pt of a train.main run"
    )
    if path.is_dir():
        inside = next((p for p in (path / "checkpoints" / "best.pt", path / "best.pt") if p.is_file()), None)
        raise CheckpointError(f"checkpoint {path} is a folder: " + (f"did you mean {inside}?" if inside else fix))
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path (train.main writes checkpoints/*.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for a damaged file (zip, pickle, EOF, ...)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason}): {fix}") from None
    missing = [key for key in REQUIRED_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was not written by train.main; {fix}")
    return state


def capture_rng(device: torch.device) -> dict[str, Any]:
    """Every random state this process draws from: torch (CPU and the rank's GPU), numpy and python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Put back the random states saved by ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
