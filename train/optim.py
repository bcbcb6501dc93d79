"""The paper's SGD rule (section 5) and the optimizer factory the trainer calls.

The paper updates ``v <- momentum * v - weight_decay * lr * w - lr * grad`` and ``w <- w + v``: the learning
rate is inside the velocity, so after an lr drop the old velocity decays over ~1 / (1 - momentum) steps.
``torch.optim.SGD`` keeps ``b <- momentum * b + grad + weight_decay * w`` and steps ``w <- w - lr * b``: the
two agree while the lr is constant, but torch rescales all accumulated momentum at once when the lr changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from preprocess.config_values import as_bool, as_choice, as_float, as_group

REFERENCE_BATCH = 128  # the paper's batch size, the base of the linear scaling rule


class PaperSGD(torch.optim.Optimizer):
    """SGD with momentum and weight decay exactly as written in the paper, the learning rate inside the velocity."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0005):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"invalid PaperSGD settings lr={lr} momentum={momentum} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                velocity = state["velocity"]
                velocity.mul_(momentum).add_(param, alpha=-weight_decay * lr).add_(param.grad, alpha=-lr)
                param.add_(velocity)
        return loss


def scaled_lr(lr: float, batch_size: int, scale_with_batch: bool) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr * batch_size / 128`` when enabled, else ``lr``."""
    return lr * batch_size / REFERENCE_BATCH if scale_with_batch else lr


OPTIMIZERS = ("paper_sgd", "sgd")


def check_optim(optim_cfg: Mapping) -> dict[str, Any]:
    """The ``optim`` group, every key converted and checked (a one-line ``ConfigValueError`` naming it)."""
    checks = {
        "name": partial(as_choice, choices=OPTIMIZERS),
        "lr": partial(as_float, low=0, low_open=True),
        "momentum": partial(as_float, low=0, high=1, high_open=True),  # 1: the velocity never decays
        "weight_decay": partial(as_float, low=0),
        "scale_lr_with_batch": as_bool,
    }
    # every key but scale_lr_with_batch is required: a missing one is None, which its check refuses
    return as_group("optim", {**dict.fromkeys(checks), "scale_lr_with_batch": False, **optim_cfg}, checks)


def build_optimizer(model: nn.Module, optim_cfg: Mapping, *, batch_size: int) -> torch.optim.Optimizer:
    """The optimizer named by ``optim_cfg["name"]`` (paper_sgd | sgd) over all of ``model``'s parameters.

    ``batch_size`` is the total batch over all ranks; it matters only with ``scale_lr_with_batch: true``.
    """
    options = check_optim(optim_cfg)
    lr = scaled_lr(options["lr"], batch_size, options["scale_lr_with_batch"])
    optimizer = PaperSGD if options["name"] == "paper_sgd" else torch.optim.SGD
    return optimizer(model.parameters(), lr=lr, momentum=options["momentum"], weight_decay=options["weight_decay"])
