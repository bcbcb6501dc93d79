"""``+experiment=alexnet`` composes the paper's recipe (section 5; ../shared/REFERENCE.md), value by value."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from train.config import check_config
from train.loop import build_model
from train.optim import check_optim

CONF = Path(__file__).resolve().parents[1] / "conf"


def alexnet_config(root: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["+experiment=alexnet", f"data.root={root}"])
    return OmegaConf.to_container(cfg, resolve=True)


def test_experiment_alexnet_is_the_papers_recipe(shard_root: Path) -> None:
    config = alexnet_config(shard_root)
    check_config(config, world_size=2)  # a valid config for the two-GPU run it describes
    data, optim, schedule = config["data"], config["optim"], config["schedule"]
    assert config["trainer"]["devices"] == 2 and data["batch_size"] == 128  # 64 per GPU
    assert data["crop_size"] == 224 and data["random_crop"] is True and data["flip"] is True
    assert data["lighting"]["sigma"] == 0.1 and data["mean"] == "pixel" and data["std"] is False
    assert check_optim(optim) == {
        "name": "paper_sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 0.0005,
        "scale_lr_with_batch": False,
    }
    assert schedule["name"] == "plateau" and schedule["factor"] == 0.1 and schedule["max_reductions"] == 3
    assert schedule["warmup_epochs"] == 0 and config["trainer"]["max_epochs"] >= 90
    assert config["trainer"]["tencrop"] is True  # the paper's test


def test_experiment_alexnet_builds_the_papers_network(shard_root: Path) -> None:
    config = alexnet_config(shard_root)
    torch.manual_seed(0)
    model = build_model(config, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert model.columns == 2 and model.activation == "relu" and model.init == "paper"
    assert model.drop.p == 0.5 and model.pool.kernel_size == 3 and model.pool.stride == 2
    lrn = model.norm1.lrn  # the printed formula: torch's alpha is divided by size, so 5 * 1e-4
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 5e-4, 0.75, 2.0)
    with torch.no_grad():
        assert torch.all(model.conv2.bias == 1.0) and torch.all(model.fc7.bias == 1.0)
        assert torch.all(model.conv1.bias == 0.0) and torch.all(model.fc8.bias == 0.0)
        assert abs(float(model.fc6.weight.std()) - 0.01) < 1e-4
