"""Learning-rate schedules: the paper's plateau rule, step and cosine decay, with optional linear warm-up.

The trainer calls, with 0-based ``epoch`` and ``step_in_epoch``::

    lr = schedule.step(epoch, step_in_epoch)      # before every optimizer step; sets every param group's lr
    schedule.end_epoch(epoch, val_top1_err)       # after each validation
    if schedule.should_stop: ...                  # plateau: no improvement after the last reduction

Each param group's lr is its base lr (``initial_lr``, recorded at construction as torch's schedulers do)
times a multiplier: ``warmup(t) * decay``. The state that matters for resuming is in ``state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from preprocess.config_values import ConfigValueError, as_choice, as_float, as_group, as_int

SCHEDULES = ("plateau", "step", "cosine")


def warmup_factor(global_step: int, warmup_steps: int) -> float:
    """Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` optimizer steps."""
    return min(1.0, (global_step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def step_factor(epoch: int, step_epochs: int | Sequence[int], factor: float) -> float:
    """``factor ** k``, k = drops passed: every ``step_epochs`` epochs (an int) or at each listed epoch."""
    if isinstance(step_epochs, int):
        drops = epoch // step_epochs
    else:
        drops = sum(epoch >= milestone for milestone in step_epochs)
    return factor**drops


def cosine_factor(global_step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """Half a cosine from 1 down to ``min_factor`` over the steps after warm-up."""
    progress = (global_step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Schedule:
    """A learning-rate schedule over a given optimizer; see the module docstring for the calls."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str = "plateau",
        *,
        steps_per_epoch: int,
        max_epochs: int,
        warmup_epochs: float = 0.0,
        factor: float = 0.1,
        patience: int = 5,
        max_reductions: int = 3,
        min_delta: float = 0.0,
        step_epochs: int | Sequence[int] = 30,
        min_lr_factor: float = 0.0,
    ):
        if name not in SCHEDULES:
            raise ValueError(f"schedule.name={name!r} is unknown: use schedule=plateau, step or cosine")
        if steps_per_epoch < 1 or max_epochs < 1:
            raise ValueError(
                f"schedule needs steps_per_epoch >= 1 and max_epochs >= 1, got {steps_per_epoch}, {max_epochs}"
            )
        self.optimizer = optimizer
        self.name = name
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = steps_per_epoch * max_epochs
        self.warmup_steps = round(warmup_epochs * steps_per_epoch)
        self.factor = factor
        self.patience = patience
        self.max_reductions = max_reductions
        self.min_delta = min_delta
        self.step_epochs = step_epochs if isinstance(step_epochs, int) else [int(e) for e in step_epochs]
        self.min_lr_factor = min_lr_factor
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        # plateau state
        self.best = math.inf
        self.bad_epochs = 0
        self.reductions = 0
        self.should_stop = False

    def factor_at(self, epoch: int, step_in_epoch: int) -> float:
        """The multiplier of the base lr at this step (pure: does not touch the optimizer)."""
        global_step = epoch * self.steps_per_epoch + step_in_epoch
        if self.name == "plateau":
            decay = self.factor**self.reductions
        elif self.name == "step":
            decay = step_factor(epoch, self.step_epochs, self.factor)
        else:
            decay = cosine_factor(global_step, self.warmup_steps, self.total_steps, self.min_lr_factor)
        return warmup_factor(global_step, self.warmup_steps) * decay

    def step(self, epoch: int, step_in_epoch: int) -> float:
        """Set every param group's lr for the coming optimizer step; returns the first group's."""
        multiplier = self.factor_at(epoch, step_in_epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * multiplier
        return self.optimizer.param_groups[0]["lr"]

    def end_epoch(self, epoch: int, val_top1_err: float) -> None:
        """Plateau rule: after ``patience`` epochs without a new best error, divide the lr by 1/factor;
        once ``max_reductions`` are used up, the next plateau sets ``should_stop``. Other schedules ignore it."""
        if self.name != "plateau":
            return
        if val_top1_err < self.best - self.min_delta:
            self.best, self.bad_epochs = float(val_top1_err), 0
            return
        self.bad_epochs += 1
        if self.bad_epochs < self.patience:
            return
        self.bad_epochs = 0
        if self.reductions < self.max_reductions:
            self.reductions += 1
        else:
            self.should_stop = True

    def state_dict(self) -> dict:
        keys = ("name", "base_lrs", "best", "bad_epochs", "reductions", "should_stop")
        return {key: getattr(self, key) for key in keys}

    def load_state_dict(self, state: Mapping) -> None:
        if state["name"] != self.name:
            raise ValueError(
                f"checkpoint schedule is {state['name']!r} but the config says {self.name!r}: keep schedule= as it was"
            )
        self.base_lrs = list(state["base_lrs"])
        self.best, self.bad_epochs = float(state["best"]), int(state["bad_epochs"])
        self.reductions, self.should_stop = int(state["reductions"]), bool(state["should_stop"])


def _step_epochs(key: str, value: Any) -> int | list[int]:
    """Every ``step_epochs`` epochs (an int >= 1), or a list of milestone epochs (each >= 1)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            raise ConfigValueError(f"{key}=[] never lowers the lr: give milestone epochs, e.g. {key}=[30,60,80]")
        return [as_int(f"{key}[{i}]", milestone, low=1) for i, milestone in enumerate(value)]
    return as_int(key, value, low=1)


CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "name": partial(as_choice, choices=SCHEDULES),
    "warmup_epochs": partial(as_float, low=0),
    "factor": partial(as_float, low=0, low_open=True),  # > 1 is allowed: it raises the lr (a test diverges a run so)
    "patience": partial(as_int, low=1),
    "max_reductions": partial(as_int, low=0),
    "min_delta": partial(as_float, low=0),
    "step_epochs": _step_epochs,
    "min_lr_factor": partial(as_float, low=0),
}


def check_schedule(schedule_cfg: Mapping) -> dict[str, Any]:
    """The ``schedule`` group with every key converted and checked: ``name`` plus that schedule's options.

    Pure (no optimizer needed), so a command can run it before starting any worker; a bad key or value is a
    one-line ``ConfigValueError`` naming it. Options another schedule reads are accepted: an experiment that sets
    the paper's plateau options still composes with ``schedule=cosine``.
    """
    return as_group("schedule", {"name": None, **schedule_cfg}, CHECKS)


def build_schedule(
    optimizer: torch.optim.Optimizer, schedule_cfg: Mapping, *, steps_per_epoch: int, max_epochs: int
) -> Schedule:
    """A ``Schedule`` from the ``schedule`` config group, checked by ``check_schedule``."""
    options = check_schedule(schedule_cfg)
    return Schedule(optimizer, steps_per_epoch=steps_per_epoch, max_epochs=max_epochs, **options)
