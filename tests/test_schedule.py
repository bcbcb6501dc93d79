"""Learning-rate schedules: the paper's plateau rule, step, cosine, warm-up, and resuming their state."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from train.optim import PaperSGD
from train.schedule import Schedule, build_schedule


def optimizer(lr: float = 0.01) -> torch.optim.Optimizer:
    return PaperSGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_plateau_divides_by_ten_three_times_then_stops() -> None:
    opt = optimizer()
    schedule = Schedule(opt, "plateau", steps_per_epoch=4, max_epochs=100, patience=2, max_reductions=3)
    # epoch:         0    1    2     3     4     5     6     7     8     9    10
    val_errors = [0.9, 0.8, 0.8, 0.85, 0.70, 0.71, 0.72, 0.60, 0.61, 0.60, 0.62]
    # improvements at 0, 1, 4, 7; two bad epochs after 1 (2, 3), after 4 (5, 6), after 7 (8, 9) -> 3 reductions
    expected_lr = [0.01, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001, 1e-4, 1e-4, 1e-4, 1e-5]
    for epoch, err in enumerate(val_errors):
        lrs = [schedule.step(epoch, step) for step in range(4)]
        assert lrs == pytest.approx([expected_lr[epoch]] * 4, rel=1e-12), epoch
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr[epoch], rel=1e-12)
        schedule.end_epoch(epoch, err)
        assert not schedule.should_stop
    assert schedule.reductions == 3
    schedule.end_epoch(11, 0.63)  # the second epoch without improvement after the last reduction
    assert schedule.should_stop


def test_plateau_min_delta_ignores_tiny_improvements() -> None:
    schedule = Schedule(optimizer(), "plateau", steps_per_epoch=1, max_epochs=10, patience=1, min_delta=0.01)
    schedule.end_epoch(0, 0.5)
    schedule.end_epoch(1, 0.495)  # better by less than min_delta: a bad epoch
    assert schedule.reductions == 1 and schedule.step(2, 0) == pytest.approx(0.001)


@pytest.mark.parametrize("step_epochs", [2, [2, 4, 6]])
def test_step_schedule(step_epochs) -> None:
    schedule = Schedule(optimizer(0.1), "step", steps_per_epoch=3, max_epochs=8, step_epochs=step_epochs)
    got = [schedule.step(epoch, 1) for epoch in range(8)]
    assert got == pytest.approx([0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4], rel=1e-12)


def test_cosine_with_linear_warmup_per_step() -> None:
    steps, epochs, warmup_epochs = 10, 5, 1
    schedule = Schedule(optimizer(0.2), "cosine", steps_per_epoch=steps, max_epochs=epochs, warmup_epochs=warmup_epochs)
    # warm-up: 0.2 * (t + 1) / 10 over the first 10 steps
    assert [schedule.step(0, s) for s in range(10)] == pytest.approx([0.02 * (s + 1) for s in range(10)])
    # then 0.2 * (1 + cos(pi * (t - 10) / 40)) / 2
    for t in (10, 20, 30, 49):
        assert schedule.step(t // steps, t % steps) == pytest.approx(0.1 * (1 + math.cos(math.pi * (t - 10) / 40)))
    assert schedule.step(1, 0) == pytest.approx(0.2) and schedule.step(3, 0) == pytest.approx(0.1)


def test_warmup_multiplies_the_plateau_lr() -> None:
    schedule = Schedule(optimizer(0.04), "plateau", steps_per_epoch=2, max_epochs=10, warmup_epochs=2)
    assert [schedule.step(e, s) for e in range(3) for s in range(2)] == pytest.approx(
        [0.01, 0.02, 0.03, 0.04, 0.04, 0.04]
    )


def test_state_dict_resumes_where_it_left_off() -> None:
    def fresh():
        opt = optimizer()
        return opt, build_schedule(opt, {"name": "plateau", "patience": 1}, steps_per_epoch=2, max_epochs=20)

    opt, schedule = fresh()
    errors = [0.9, 0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7]
    for epoch, err in enumerate(errors[:4]):
        schedule.step(epoch, 0)
        schedule.end_epoch(epoch, err)
    saved_opt, saved_schedule = opt.state_dict(), schedule.state_dict()
    tail_uninterrupted = []
    for epoch, err in enumerate(errors[4:], start=4):
        tail_uninterrupted.append((schedule.step(epoch, 0), schedule.should_stop))
        schedule.end_epoch(epoch, err)

    opt2, resumed = fresh()
    opt2.load_state_dict(saved_opt)  # carries the decayed lr and initial_lr
    resumed.load_state_dict(saved_schedule)
    tail_resumed = []
    for epoch, err in enumerate(errors[4:], start=4):
        tail_resumed.append((resumed.step(epoch, 0), resumed.should_stop))
        resumed.end_epoch(epoch, err)
    assert tail_resumed == tail_uninterrupted
    assert resumed.should_stop == schedule.should_stop
    assert resumed.base_lrs == [0.01]


def test_base_lr_survives_an_optimizer_loaded_before_the_schedule_is_built() -> None:
    opt, schedule_cfg = optimizer(), {"name": "plateau", "patience": 1}
    schedule = build_schedule(opt, schedule_cfg, steps_per_epoch=1, max_epochs=5)
    schedule.end_epoch(0, 0.5)
    schedule.end_epoch(1, 0.5)
    schedule.step(2, 0)
    saved = opt.state_dict()
    opt2 = optimizer()
    opt2.load_state_dict(saved)  # its lr is now 0.001, its initial_lr 0.01
    assert build_schedule(opt2, schedule_cfg, steps_per_epoch=1, max_epochs=5).base_lrs == [0.01]


@pytest.mark.parametrize("name", ["plateau", "step", "cosine"])
def test_config_groups_build(name: str) -> None:
    cfg = OmegaConf.load(f"conf/schedule/{name}.yaml")
    schedule = build_schedule(optimizer(), cfg, steps_per_epoch=5, max_epochs=90)
    assert schedule.name == name and schedule.step(0, 0) == pytest.approx(0.01)


def test_bad_schedule_configs_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="schedule.name='linear'"):
        build_schedule(optimizer(), {"name": "linear"}, steps_per_epoch=5, max_epochs=9)
    with pytest.raises(ValueError, match="unknown keys \\['patients'\\]"):
        build_schedule(optimizer(), {"name": "plateau", "patients": 3}, steps_per_epoch=5, max_epochs=9)
    with pytest.raises(ValueError, match="schedule.step_epochs=\\[\\] never lowers the lr"):
        build_schedule(optimizer(), {"name": "step", "step_epochs": []}, steps_per_epoch=5, max_epochs=9)
