"""The ``trainer`` config group as a typed object, and the checks the parent runs before starting workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.config import DataSpec
from preprocess.config_values import as_bool, as_choice, as_float, as_int

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
        """The ``trainer`` group, each key converted and checked (a one-line error naming the key)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown key trainer.{unknown[0]}: the trainer keys are {sorted(known)}")
        given = {**dataclasses.asdict(cls()), **values}
        return cls(
            devices=as_int("trainer.devices", given["devices"], low=1),
            accelerator=as_choice("trainer.accelerator", given["accelerator"], ACCELERATORS),
            max_epochs=as_int("trainer.max_epochs", given["max_epochs"], low=1),
            seed=as_int("trainer.seed", given["seed"], low=0),
            resume=_check_resume(given["resume"]),
            log_every=as_int("trainer.log_every", given["log_every"], low=1),
            precision=as_choice("trainer.precision", given["precision"], PRECISIONS),
            channels_last=as_bool("trainer.channels_last", given["channels_last"]),
            compile=as_bool("trainer.compile", given["compile"]),
            cudnn_benchmark=as_bool("trainer.cudnn_benchmark", given["cudnn_benchmark"]),
            tencrop=as_bool("trainer.tencrop", given["tencrop"]),
            progress=as_bool("trainer.progress", given["progress"]),
            timeout_s=as_float("trainer.timeout_s", given["timeout_s"], low=0, low_open=True),
        )

    @property
    def use_gpu(self) -> bool:
        """GPUs when asked for, or with ``auto`` when one is visible."""
        return self.accelerator == "gpu" or (self.accelerator == "auto" and torch.cuda.is_available())

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    @property
    def bf16(self) -> bool:
        """bf16 autocast: by default (``auto``) on GPUs with native bf16 (Ampere and later; older ones would emulate
        it, slower than fp32), fp32 on other GPUs and on the CPU."""
        if self.precision == "auto":
            return self.use_gpu and torch.cuda.is_bf16_supported(including_emulation=False)
        return self.precision == "bf16"


def check_devices(trainer: TrainerConfig) -> None:
    """GPUs requested must exist (checked in the parent, before any worker starts)."""
    if trainer.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator=gpu but no GPU is visible: use trainer.accelerator=cpu (or auto)")
    if trainer.use_gpu and trainer.devices > torch.cuda.device_count():
        raise ConfigError(
            f"trainer.devices={trainer.devices} but only {torch.cuda.device_count()} GPUs are visible: lower it"
        )


def _check_resume(value: Any) -> str:
    """``trainer.resume``: auto, never or a checkpoint path (text, not empty)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"trainer.resume={value!r} must be auto, never or the path of a checkpoint")
    return value


def check_batch(data: Mapping[str, Any], world_size: int) -> None:
    """The ``data`` group (every key, ``DataSpec.from_cfg``); ``data.batch_size``, the total over all ranks,
    must split evenly. The parent runs this before any worker starts."""
    batch = DataSpec.from_cfg(data).batch_size
    if batch < world_size or batch % world_size:
        raise ConfigError(
            f"data.batch_size={batch} does not split over {world_size} ranks: use a multiple of {world_size}"
        )


def check_config(config: Mapping[str, Any], world_size: int) -> None:
    """Every group's values (data, model, optim, schedule): the parent runs this before any worker starts, so a
    bad value is one line at once, not after spawning and building loaders."""
    from train.model import check_model
    from train.optim import check_optim
    from train.schedule import check_schedule

    check_batch(config["data"], world_size)
    check_model(config["model"])
    check_optim(config["optim"])
    check_schedule(config["schedule"])
