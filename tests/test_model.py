"""AlexNet: the paper's sizes, LRN formula, column split, initialisation and ablation switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from preprocess.config_values import ConfigValueError
from train.model import AlexNet, ColumnLRN, feature_sizes

PAPER_PARAMETERS = 60_965_224
PAPER_NEURONS = [290_400, 186_624, 64_896, 64_896, 43_264, 4096, 4096, 1000]
PAPER_CHANNELS = {"conv1": 96, "conv2": 256, "conv3": 384, "conv4": 384, "conv5": 256}
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]


@pytest.fixture(scope="module")
def paper_net() -> AlexNet:
    torch.manual_seed(0)
    return AlexNet(1000).eval()


def test_parameter_count_is_the_papers(paper_net: AlexNet) -> None:
    assert sum(p.numel() for p in paper_net.parameters()) == PAPER_PARAMETERS


def test_neurons_per_layer_are_the_papers(paper_net: AlexNet) -> None:
    outputs = {}
    hooks = [
        getattr(paper_net, name).register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in LAYERS
    ]
    with torch.no_grad():
        logits = paper_net(torch.randn(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    assert [outputs[name][0].numel() for name in LAYERS] == PAPER_NEURONS
    assert tuple(outputs["conv1"].shape) == (1, 96, 55, 55)
    assert logits.shape == (1, 1000)


def test_one_column_net_has_dense_conv2_conv4_conv5() -> None:
    net = AlexNet(1000, columns=1)
    assert all(getattr(net, name).groups == 1 for name in ("conv2", "conv4", "conv5"))
    # the grouped layers' weights double: conv2 256x48x5x5, conv4 384x192x3x3, conv5 256x192x3x3 more
    extra = 256 * 48 * 25 + 384 * 192 * 9 + 256 * 192 * 9
    assert sum(p.numel() for p in net.parameters()) == PAPER_PARAMETERS + extra


def test_grouped_layers_connect_only_within_their_column(paper_net: AlexNet) -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 96, 27, 27)
    y = x.clone()
    y[:, 48:] += torch.randn(1, 48, 27, 27)  # change only the second column's inputs
    with torch.no_grad():
        a, b = paper_net.conv2(x), paper_net.conv2(y)
    torch.testing.assert_close(a[:, :128], b[:, :128])  # not bit-equal: two calls may take different kernels
    assert not torch.allclose(a[:, 128:], b[:, 128:])
    assert paper_net.conv3.groups == 1  # conv3 sees both halves


def lrn_numpy(a: np.ndarray, columns: int, k=2.0, n=5, alpha=1e-4, beta=0.75) -> np.ndarray:
    """The paper's formula, b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta, per column."""
    out = np.empty_like(a)
    per_column = a.shape[1] // columns
    for column in range(columns):
        lo_col = column * per_column
        for i in range(per_column):
            lo, hi = max(0, i - n // 2), min(per_column - 1, i + n // 2)
            s = (a[:, lo_col + lo : lo_col + hi + 1] ** 2).sum(axis=1)
            out[:, lo_col + i] = a[:, lo_col + i] / (k + alpha * s) ** beta
    return out


@pytest.mark.parametrize("columns", [1, 2])
def test_lrn_is_the_printed_formula(columns: int) -> None:
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 60, size=(2, 12, 3, 3)).astype(np.float64)  # large values so alpha matters
    got = ColumnLRN(columns).double()(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, lrn_numpy(a, columns), rtol=1e-10)
    # channels_last (the GPU layout) in, the same numbers and channels_last out: no copies around the next conv
    nhwc = ColumnLRN(columns).double()(torch.from_numpy(a).contiguous(memory_format=torch.channels_last))
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and np.array_equal(nhwc.numpy(), got)
    # torch's own module with alpha=1e-4 is a different (n times weaker) normalisation
    torch_default = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(torch.from_numpy(a)).numpy()
    assert not np.allclose(torch_default, lrn_numpy(a, 1), rtol=1e-3)


def test_initialisation_follows_section_5(paper_net: AlexNet) -> None:
    for name in LAYERS:
        layer = getattr(paper_net, name)
        weight = layer.weight.detach()
        assert abs(weight.mean().item()) < 1e-3 and weight.std().item() == pytest.approx(0.01, rel=0.05)
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected_bias), name


def test_small_crop_geometry_and_forward() -> None:
    assert feature_sizes(64) == {"conv1": 15, "conv2": 7, "conv3": 3, "conv4": 3, "conv5": 3, "pool5": 1}
    net = AlexNet(10, crop_size=64, width=0.25)
    assert net.fc6.in_features == 64 * 1 * 1
    assert net(torch.randn(3, 3, 64, 64)).shape == (3, 10)


def test_too_small_crop_is_a_one_line_error() -> None:
    with pytest.raises(ConfigValueError, match="crop_size=40") as err:
        AlexNet(10, crop_size=40)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("width, columns", [(0.25, 2), (0.1, 2), (0.3, 1)])
def test_width_keeps_channels_divisible_by_columns(width: float, columns: int) -> None:
    net = AlexNet(10, crop_size=64, width=width, columns=columns)
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
        conv = getattr(net, name)
        assert conv.out_channels % columns == 0 and conv.out_channels >= columns
        assert conv.out_channels == pytest.approx(PAPER_CHANNELS[name] * width, abs=columns)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 10)


def test_ablation_switches_change_the_network() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64) * 50
    plain = AlexNet(10, crop_size=64, width=0.25, lrn=False, overlapping_pool=False, activation="tanh", dropout=0.0)
    assert isinstance(plain.norm1, nn.Identity) and plain.pool.kernel_size == 2
    seen = {}
    plain.conv2.register_forward_pre_hook(lambda m, i: seen.__setitem__("conv2_in", i[0]))
    plain.train()
    out1, out2 = plain(x), plain(x)
    # no dropout: training mode is deterministic, up to rounding (MKL does not promise bit-equal results from one call
    # to the next: its path may depend on buffer alignment and thread count; a CI run once saw them differ)
    torch.testing.assert_close(out1, out2)
    assert seen["conv2_in"].min() < 0 and seen["conv2_in"].abs().max() <= 1  # tanh, not relu
    dropped = AlexNet(10, crop_size=64, width=0.25).train()
    assert not torch.allclose(dropped(x), dropped(x))
    dropped.eval()
    torch.testing.assert_close(dropped(x), dropped(x))


def test_embed_is_fc7_after_relu() -> None:
    net = AlexNet(10, crop_size=64, width=0.25).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        features = net.embed(x)
        assert features.shape == (4, net.fc7.out_features) and features.min() >= 0
        torch.testing.assert_close(net.fc8(features), net(x))


def test_config_group_holds_the_keyword_arguments() -> None:
    cfg = OmegaConf.load("conf/model/alexnet.yaml")
    net = AlexNet(1000, crop_size=224, **cfg)
    assert sum(p.numel() for p in net.parameters()) == PAPER_PARAMETERS


@pytest.mark.parametrize(
    "bad", [{"columns": 3}, {"activation": "gelu"}, {"width": 0}, {"dropout": 1.0}, {"lrn": "no"}, {"init": "xavier"}]
)
def test_bad_settings_are_one_line_errors(bad: dict) -> None:
    with pytest.raises(ConfigValueError) as err:
        AlexNet(10, crop_size=64, **bad)
    assert "model." in str(err.value) and "\n" not in str(err.value)


def test_kaiming_initialisation_has_he_std_and_zero_biases() -> None:
    torch.manual_seed(0)
    net = AlexNet(10, init="kaiming")
    for name in ("conv3", "fc6"):
        layer = getattr(net, name)
        fan_in = layer.weight[0].numel()
        assert float(layer.weight.detach().std()) == pytest.approx(np.sqrt(2.0 / fan_in), rel=0.02), name
        assert torch.all(layer.bias == 0), name
    with pytest.raises(ConfigValueError, match="model.init"):
        AlexNet(10, init="xavier")
