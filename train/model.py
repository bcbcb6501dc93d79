"""The network of Krizhevsky et al. (2012), section 3, with switches for the paper's ablations.

Layout (width=1, columns=2, 224x224 input)::

    conv1 96x11x11/4 pad 2 -> act -> LRN -> maxpool 3/2      55x55x96  -> 27x27x96
    conv2 256x5x5 pad 2, within each column -> act -> LRN -> maxpool   27x27x256 -> 13x13x256
    conv3 384x3x3 pad 1, across columns -> act                13x13x384
    conv4 384x3x3 pad 1, within each column -> act            13x13x384
    conv5 256x3x3 pad 1, within each column -> act -> maxpool 13x13x256 -> 6x6x256
    fc6 4096 -> act -> dropout, fc7 4096 -> act -> dropout, fc8 num_classes (logits)

The paper's two-GPU split is expressed as grouped convolutions (``groups=columns``) in conv2, conv4 and conv5;
conv1 and conv3 and the fully-connected layers see all channels. LRN and pooling act on each column's maps
separately, as cuda-convnet did with one normalisation layer per GPU.

LRN follows the formula printed in the paper, ``b = a / (k + alpha * sum_{n adjacent maps} a^2) ** beta`` with
k=2, n=5, alpha=1e-4, beta=0.75. ``torch.nn.LocalResponseNorm`` (like Caffe and cuda-convnet) divides alpha by
n, so the printed formula is ``LocalResponseNorm(5, alpha=5 * 1e-4, beta=0.75, k=2)``.

PyTorch rounds convolution output sizes down, so conv1 gets padding 2 to give 55x55 maps from 224 (as
torchvision does); fc6's input size is computed from ``crop_size``, so smaller crops (64 in the tests) work.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from preprocess.config_values import ConfigValueError, as_bool, as_choice, as_float, as_group, as_int

LRN_SIZE = 5
LRN_ALPHA = 1e-4  # as printed in the paper, NOT divided by LRN_SIZE
LRN_BETA = 0.75
LRN_K = 2.0
INIT_STD = 0.01
ONE_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")

# (name, output channels at width 1, kernel, stride, padding, grouped by column)
CONV_LAYERS = (
    ("conv1", 96, 11, 4, 2, False),
    ("conv2", 256, 5, 1, 2, True),
    ("conv3", 384, 3, 1, 1, False),
    ("conv4", 384, 3, 1, 1, True),
    ("conv5", 256, 3, 1, 1, True),
)
POOLED = ("conv1", "conv2", "conv5")
HIDDEN = 4096
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}
INITS = ("paper", "kaiming")


def conv_out(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output size of a convolution or pooling window, rounded down as PyTorch does."""
    return (size + 2 * padding - kernel) // stride + 1


def feature_sizes(crop_size: int, overlapping_pool: bool = True) -> dict[str, int]:
    """Spatial size (height = width) of each conv layer's output and of the final pooled map (``"pool5"``)."""
    pool_kernel = 3 if overlapping_pool else 2
    sizes, size = {}, crop_size
    for name, _, kernel, stride, padding, _ in CONV_LAYERS:
        size = conv_out(size, kernel, stride, padding)
        sizes[name] = size
        if name in POOLED:
            size = conv_out(size, pool_kernel, 2)
        if size < 1:
            raise ConfigValueError(
                f"crop_size={crop_size} is too small for AlexNet: maps vanish after {name}; use crop_size 63 or more"
            )
    sizes["pool5"] = size
    return sizes


def scaled_channels(channels: int, width: float, columns: int) -> int:
    """``channels * width``, rounded to a positive multiple of ``columns`` so grouped convolutions split evenly."""
    return max(columns, round(channels * width / columns) * columns)


class ColumnLRN(nn.Module):
    """The paper's local response normalisation across ``size`` adjacent maps, within each column's maps."""

    def __init__(
        self, columns: int, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA, k: float = LRN_K
    ):
        super().__init__()
        self.columns = columns
        # torch divides alpha by size; multiply it back so the module computes the printed formula
        self.lrn = nn.LocalResponseNorm(size, alpha=alpha * size, beta=beta, k=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if x.is_contiguous():  # NCHW: the columns are a free reshape
            return self.lrn(x.view(n * self.columns, c // self.columns, h, w)).view(n, c, h, w)
        # channels_last (GPU): that reshape would copy to NCHW and the next convolution would copy back
        return torch.cat([self.lrn(column) for column in x.chunk(self.columns, dim=1)], dim=1)


def check_model(model_cfg: Mapping) -> dict[str, Any]:
    """The ``model`` group as ``AlexNet`` keywords, each value converted and checked (one line naming the key)."""
    checks = {
        "columns": partial(as_int, low=1, high=2),
        "lrn": as_bool,
        "overlapping_pool": as_bool,
        "activation": partial(as_choice, choices=tuple(ACTIVATIONS)),
        "dropout": partial(as_float, low=0, high=1, high_open=True),
        "width": partial(as_float, low=0, low_open=True),
        "init": partial(as_choice, choices=tuple(INITS)),
    }
    return as_group("model", model_cfg, checks)


class AlexNet(nn.Module):
    """AlexNet as in the paper; the keyword switches give its ablations (section 3 and Figure 1).

    columns: 2 = the paper's two-GPU net (conv2/4/5 grouped), 1 = one column (all convolutions dense).
    lrn: local response normalisation after conv1 and conv2. overlapping_pool: max-pool z=3 s=2, else z=2 s=2.
    activation: "relu" or "tanh" (Figure 1). dropout: probability in fc6 and fc7 (0 disables it).
    width: multiplier of every conv channel count and of the hidden fc size (narrow nets for tests and demos).
    init: "paper" (section 5: N(0, 0.01), biases 1 in conv2/4/5, fc6, fc7) or "kaiming" (He et al. 2015 normal
    weights for the activation, zero biases). N(0, 0.01) was tuned for the full-width net on 224 px crops; in
    narrow nets or on small crops its signal vanishes through the eight layers and the loss stays at chance
    (as Caffe's authors found with biases 1), so the small CPU experiments use "kaiming".
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        crop_size: int = 224,
        columns: int = 2,
        lrn: bool = True,
        overlapping_pool: bool = True,
        activation: str = "relu",
        dropout: float = 0.5,
        width: float = 1.0,
        init: str = "paper",
    ):
        super().__init__()
        check_model(  # a bad value: one line naming it
            dict(
                columns=columns,
                lrn=lrn,
                overlapping_pool=overlapping_pool,
                activation=activation,
                dropout=dropout,
                width=width,
                init=init,
            )
        )
        self.columns = columns
        self.activation = activation
        self.init = init
        self.act = ACTIVATIONS[activation]()

        in_channels = 3
        for name, channels, kernel, stride, padding, grouped in CONV_LAYERS:
            out_channels = scaled_channels(channels, width, columns)
            conv = nn.Conv2d(in_channels, out_channels, kernel, stride, padding, groups=columns if grouped else 1)
            setattr(self, name, conv)
            in_channels = out_channels
        self.norm1 = ColumnLRN(columns) if lrn else nn.Identity()
        self.norm2 = ColumnLRN(columns) if lrn else nn.Identity()
        self.pool = nn.MaxPool2d(3 if overlapping_pool else 2, stride=2)

        hidden = scaled_channels(HIDDEN, width, 1)
        spatial = feature_sizes(crop_size, overlapping_pool)["pool5"]
        self.fc6 = nn.Linear(in_channels * spatial * spatial, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.fc8 = nn.Linear(hidden, num_classes)
        self.drop = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``init="paper"``: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6 and fc7, 0 elsewhere
        (section 5). ``init="kaiming"``: He-normal weights (fan-in, gain of the activation), biases 0."""
        for name, module in self.named_children():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if self.init == "paper":
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
                nn.init.constant_(module.bias, 1.0 if name in ONE_BIAS_LAYERS else 0.0)
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity=self.activation)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled conv5 maps, flattened: the input of fc6."""
        x = self.pool(self.norm1(self.act(self.conv1(x))))
        x = self.pool(self.norm2(self.act(self.conv2(x))))
        x = self.act(self.conv3(x))
        x = self.act(self.conv4(x))
        x = self.pool(self.act(self.conv5(x)))
        return torch.flatten(x, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """fc7 activations (N, hidden) after the non-linearity, before dropout: the features of Figure 4 (right)."""
        x = self.drop(self.act(self.fc6(self.features(x))))
        return self.act(self.fc7(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.drop(self.embed(x)))
