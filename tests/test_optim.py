"""The paper's SGD rule against hand-computed sequences, and how it differs from torch.optim.SGD."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from train.model import AlexNet
from train.optim import PaperSGD, build_optimizer


def run_constant_gradient(optimizer_cls, lrs: list[float], **kwargs) -> list[float]:
    """Weights after each step of minimising with gradient 1 throughout, starting from w = 1."""
    w = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = optimizer_cls([w], lr=lrs[0], **kwargs)
    weights = []
    for lr in lrs:
        for group in optimizer.param_groups:
            group["lr"] = lr
        w.grad = torch.ones_like(w)
        optimizer.step()
        weights.append(w.item())
    return weights


def test_paper_rule_by_hand_across_an_lr_drop() -> None:
    # v1 = -0.1,                 w1 = 0.9
    # v2 = 0.9*-0.1 - 0.1  = -0.19,  w2 = 0.71
    # v3 = 0.9*-0.19 - 0.01 = -0.181, w3 = 0.529   (lr dropped to 0.01: the old velocity carries on)
    # v4 = 0.9*-0.181 - 0.01 = -0.1729, w4 = 0.3561
    got = run_constant_gradient(PaperSGD, [0.1, 0.1, 0.01, 0.01], momentum=0.9, weight_decay=0.0)
    assert got == pytest.approx([0.9, 0.71, 0.529, 0.3561], abs=1e-12)


def test_torch_sgd_rescales_the_momentum_at_the_drop() -> None:
    # b1 = 1, w1 = 0.9; b2 = 1.9, w2 = 0.71; b3 = 2.71, w3 = 0.71 - 0.0271 = 0.6829; b4 = 3.439, w4 = 0.64851
    got = run_constant_gradient(torch.optim.SGD, [0.1, 0.1, 0.01, 0.01], momentum=0.9, weight_decay=0.0)
    assert got == pytest.approx([0.9, 0.71, 0.6829, 0.64851], abs=1e-12)
    paper = run_constant_gradient(PaperSGD, [0.1, 0.1, 0.01, 0.01], momentum=0.9, weight_decay=0.0)
    assert got[:2] == pytest.approx(paper[:2]) and abs(got[2] - paper[2]) > 0.1


def test_weight_decay_inside_the_velocity_matches_a_plain_python_loop() -> None:
    """v <- 0.9 v - 0.0005 lr w - lr grad, w <- w + v on loss 0.5 * a * w^2 (grad = a * w), across two lr drops."""
    a, lrs = [3.0, -1.0, 0.5], [0.05] * 4 + [0.005] * 4 + [0.0005] * 4
    w_ref, v_ref = [1.0, 2.0, -1.5], [0.0, 0.0, 0.0]
    w = torch.nn.Parameter(torch.tensor(w_ref, dtype=torch.float64))
    optimizer = PaperSGD([w], lr=lrs[0], momentum=0.9, weight_decay=0.0005)
    for lr in lrs:
        optimizer.param_groups[0]["lr"] = lr
        optimizer.zero_grad()
        (0.5 * torch.tensor(a, dtype=torch.float64) * w**2).sum().backward()
        optimizer.step()
        for i in range(3):
            v_ref[i] = 0.9 * v_ref[i] - 0.0005 * lr * w_ref[i] - lr * a[i] * w_ref[i]
            w_ref[i] += v_ref[i]
        assert w.tolist() == pytest.approx(w_ref, rel=1e-12, abs=1e-15)


def test_equals_torch_sgd_while_the_lr_is_constant() -> None:
    torch.manual_seed(0)
    nets = [AlexNet(10, crop_size=64, width=0.125, dropout=0.0).double() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    optimizers = [
        PaperSGD(nets[0].parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005),
        torch.optim.SGD(nets[1].parameters(), lr=0.01, momentum=0.9, weight_decay=0.0005),
    ]
    x, y = torch.randn(8, 3, 64, 64, dtype=torch.float64) * 30, torch.arange(8) % 10
    for _ in range(3):
        for net, optimizer in zip(nets, optimizers, strict=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_build_optimizer_from_the_config_groups() -> None:
    net = torch.nn.Linear(4, 2)
    paper = build_optimizer(net, OmegaConf.load("conf/optim/paper_sgd.yaml"), batch_size=128)
    assert isinstance(paper, PaperSGD)
    assert paper.defaults == {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005}
    sgd = build_optimizer(net, OmegaConf.load("conf/optim/sgd.yaml"), batch_size=128)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9


def test_linear_scaling_rule() -> None:
    cfg = {"name": "paper_sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "scale_lr_with_batch": True}
    assert build_optimizer(torch.nn.Linear(2, 2), cfg, batch_size=1024).param_groups[0]["lr"] == pytest.approx(0.08)
    cfg["scale_lr_with_batch"] = False
    assert build_optimizer(torch.nn.Linear(2, 2), cfg, batch_size=1024).param_groups[0]["lr"] == pytest.approx(0.01)


def test_unknown_optimizer_is_a_one_line_error() -> None:
    cfg = {"name": "adam", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0}
    with pytest.raises(ValueError, match="optim.name='adam'"):
        build_optimizer(torch.nn.Linear(2, 2), cfg, batch_size=128)


@pytest.mark.parametrize("momentum", [1.0, -0.1])
def test_momentum_outside_zero_to_one_is_a_one_line_error(momentum: float) -> None:
    cfg = {"name": "paper_sgd", "lr": 0.01, "momentum": momentum, "weight_decay": 0.0}
    with pytest.raises(ValueError, match=f"optim.momentum={momentum!r} must be a number"):
        build_optimizer(torch.nn.Linear(2, 2), cfg, batch_size=128)
