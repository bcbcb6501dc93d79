"""The ``trainer`` config group as a typed object, and the checks the parent runs before starting workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu")


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line naming the key and the fix."""


@dataclass(frozen=True)
class TrainerConfig:
    """conf/trainer/default.yaml, key for key (the yaml file documents each one)."""

    devices: int = 1
    accelerator: str = "auto"
    max_epochs: int = 90
    seed: int = 0
    resume: str = "auto"
    log_every: int = 50
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    tencrop: bool = True
    progress: bool = True
    timeout_s: float = 300.0

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainerConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown key trainer.{unknown[0]}: the trainer keys are {sorted(known)}")
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        if self.devices < 1 or self.max_epochs < 1 or self.log_every < 1:
            raise ConfigError(
                f"trainer.devices={self.devices}, trainer.max_epochs={self.max_epochs} and "
                f"trainer.log_every={self.log_every} must all be at least 1"
            )
        if self.accelerator not in ACCELERATORS:
            raise ConfigError(f"trainer.accelerator={self.accelerator!r} is unknown: use one of {ACCELERATORS}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r} is unknown: use one of {PRECISIONS}")

    @property
    def use_gpu(self) -> bool:
        """GPUs when asked for, or with ``auto`` when one is visible."""
        return self.accelerator == "gpu" or (self.accelerator == "auto" and torch.cuda.is_available())

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    @property
    def bf16(self) -> bool:
        """bf16 autocast: on GPUs by default (``auto``), fp32 on the CPU."""
        return self.precision == "bf16" or (self.precision == "auto" and self.use_gpu)


def check_devices(trainer: TrainerConfig) -> None:
    """GPUs requested must exist (checked in the parent, before any worker starts)."""
    if trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu but no GPU is visible: use trainer.accelerator=cpu (or auto)")
    if trainer.use_gpu and trainer.devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={trainer.devices} but only {torch.cuda.device_count()} GPUs are visible: lower it"
        )


def check_batch(data: Mapping[str, Any], world_size: int) -> None:
    """``data.batch_size`` is the total over all ranks and must split evenly."""
    batch = int(data["batch_size"])
    if batch < world_size or batch % world_size:
        raise ConfigError(
            f"data.batch_size={batch} does not split over {world_size} ranks: use a multiple of {world_size}"
        )
