"""The paper's Figures 3 and 4 and the training curves, for a trained checkpoint.

    python -m train.visualize checkpoint=PATH data.root=PATH out=DIR [predictions=8 queries=4 pool=1000]

Writes into DIR:

- ``figure3_kernels.png``: the conv1 kernels (96 x 11x11x3 in the paper's net) as colour patches, each
  column's (GPU's) kernels in its own block, as in Figure 3;
- ``figure4_predictions.png``: validation images (centre crop) with the five most probable classes as bars,
  the true class in red (Figure 4, left);
- ``figure4_retrieval.png``: validation images and the six training images whose fc7 activations (the last
  hidden layer) are nearest in Euclidean distance, among the first ``pool`` training images (Figure 4, right);
- ``curves.png``: loss, training and validation error and learning rate against epochs, from the run's
  ``metrics.jsonl`` (by default the one in the checkpoint's run dir).

Images go through the checkpoint's own data config (centre crops, its mean and std); only ``data.root``,
``data.threads`` and ``data.loader`` come from the command line. Every PNG is written under a temporary
name and renamed when complete.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.config import DataSpec
from pipeline.preview import collect, denormalize, save_figure
from preprocess.cli import run_cli
from preprocess.config_values import as_int
from preprocess.shard_format import DatasetError, read_meta
from train.checkpoint import load_checkpoint
from train.evaluate import eval_data_config, trained_model
from train.loop import EXIT_BAD_INPUT, USER_ERRORS
from train.runlog import METRICS_FILE

KERNELS_PER_ROW = 16
TRUE_COLOUR, OTHER_COLOUR = "tab:red", "tab:blue"


# ---------------------------------------------------------------- pure functions


def kernel_blocks(weight: np.ndarray, columns: int, per_row: int = KERNELS_PER_ROW, gap: int = 1) -> list[np.ndarray]:
    """conv1 weights (K, 3, h, w) -> one RGB image in [0, 1] per column, kernels tiled ``per_row`` a row.

    Each kernel is scaled on its own, ``0.5 + w / (2 max|w|)``: zero is mid-grey and the sign of each colour
    is kept, so colour-opponent and oriented kernels read at a glance. Gaps between kernels are white.
    """
    k, channels, h, w = weight.shape
    if channels != 3 or k % columns:
        raise ValueError(f"conv1 weights {weight.shape} are not RGB kernels splittable into {columns} columns")
    scale = np.abs(weight).reshape(k, -1).max(axis=1).clip(min=1e-12)[:, None, None, None]
    kernels = (0.5 + weight / (2 * scale)).transpose(0, 2, 3, 1)  # (K, h, w, 3)
    blocks = []
    for column in np.split(kernels, columns):
        cols = min(per_row, len(column))
        rows = math.ceil(len(column) / cols)
        block = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, 3))
        for i, kernel in enumerate(column):
            r, c = divmod(i, cols)
            block[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = kernel
        blocks.append(block)
    return blocks


def top_classes(probs: torch.Tensor, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable classes of each row and their probabilities, most probable first."""
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return indices.numpy(), values.numpy()


def nearest(queries: torch.Tensor, pool: torch.Tensor, k: int) -> np.ndarray:
    """Indices (Q, k) of the ``k`` pool rows nearest to each query row in Euclidean distance, nearest first."""
    return torch.cdist(queries.double(), pool.double()).topk(min(k, len(pool)), dim=1, largest=False).indices.numpy()


def read_curves(path: str | Path) -> dict[str, np.ndarray]:
    """Epoch-end values (x = epochs completed) and per-step loss (x = fractional epochs) from metrics.jsonl."""
    try:
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        epochs = [r for r in records if r.get("kind") == "epoch"]
        steps = [r for r in records if r.get("kind") == "step"]
        if not epochs:
            raise DatasetError(f"{path} has no epoch lines yet: plot the curves after the first epoch has finished")
        curves = {key: np.array([r[key] for r in epochs], dtype=float) for key in epochs[0] if key != "kind"}
        curves["x"] = curves["epoch"]  # train.main numbers epochs from 1: an epoch line is written at its end
        ends = np.concatenate([[0.0], curves["step"]])
        curves["step_x"] = np.interp([r["step"] for r in steps], ends, np.arange(len(ends)))
        curves["step_loss"] = np.array([r["loss"] for r in steps], dtype=float)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
        raise DatasetError(f"{path} is not a metrics.jsonl of train.main ({type(err).__name__}: {err})") from None
    return curves


# ---------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernels(weight: np.ndarray, columns: int, path: Path) -> Path:
    plt = _pyplot()
    blocks = kernel_blocks(weight, columns)
    height = blocks[0].shape[0] / blocks[0].shape[1] * 8
    fig, axes = plt.subplots(len(blocks), 1, figsize=(8, len(blocks) * (height + 0.5)))
    for i, (ax, block) in enumerate(zip(np.atleast_1d(axes), blocks, strict=True)):
        ax.imshow(block, interpolation="nearest")
        ax.set_axis_off()
        label = f"column {i + 1} (GPU {i + 1})" if columns > 1 else "one column"
        ax.set_title(f"{label}: {len(weight) // columns} kernels", fontsize=10, loc="left")
    fig.suptitle(f"conv1 kernels, {weight.shape[2]}x{weight.shape[3]}x3 (Figure 3)", fontsize=12, y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_predictions(views: np.ndarray, labels: np.ndarray, probs: torch.Tensor, names: Sequence[str], path: Path):
    plt = _pyplot()
    indices, values = top_classes(probs)
    cols = min(4, len(views))
    rows = math.ceil(len(views) / cols)
    fig = plt.figure(figsize=(3.2 * cols, 4.6 * rows))
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1.6] * rows, hspace=0.35, wspace=0.45)
    for i, (view, label) in enumerate(zip(views, labels, strict=True)):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(view)
        ax.set_axis_off()
        ax.set_title(names[label], fontsize=11, fontweight="bold")
        bars = fig.add_subplot(grid[2 * r + 1, c])
        colours = [TRUE_COLOUR if j == label else OTHER_COLOUR for j in indices[i]]
        y = np.arange(len(indices[i]))[::-1]
        bars.barh(y, values[i], color=colours)
        bars.set_yticks(y, [names[j] for j in indices[i]], fontsize=9)
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=7)
        for spine in ("top", "right"):
            bars.spines[spine].set_visible(False)
    fig.suptitle("Top-5 predictions on validation images (true class in red) - Figure 4, left", fontsize=12)
    return save_figure(fig, path)


def plot_retrieval(queries: np.ndarray, query_labels, pool: np.ndarray, pool_labels, neighbours, names, path: Path):
    plt = _pyplot()
    rows, cols = len(queries), 1 + neighbours.shape[1]
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.9 * rows), squeeze=False)
    for r in range(rows):
        axes[r, 0].imshow(queries[r])
        axes[r, 0].set_title(f"query: {names[query_labels[r]]}", fontsize=9, fontweight="bold")
        for c, index in enumerate(neighbours[r], start=1):
            same = pool_labels[index] == query_labels[r]
            axes[r, c].imshow(pool[index])
            axes[r, c].set_title(names[pool_labels[index]], fontsize=9, color="tab:green" if same else TRUE_COLOUR)
        for ax in axes[r]:
            ax.set_axis_off()
    fig.suptitle("Six training images nearest in fc7 space (Euclidean) - Figure 4, right", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(curves: Mapping[str, np.ndarray], path: Path) -> Path:
    plt = _pyplot()
    fig, (loss, err, lr) = plt.subplots(1, 3, figsize=(15, 4))
    if len(curves["step_loss"]):
        loss.plot(curves["step_x"], curves["step_loss"], color="tab:blue", alpha=0.3, lw=1, label="train (steps)")
    loss.plot(curves["x"], curves["loss"], "o-", color="tab:blue", label="train (epoch)")
    loss.set(title="loss", xlabel="epoch", ylabel="cross-entropy")
    err.plot(curves["x"], curves["train_top1_err"], "o-", label="train top-1")
    err.plot(curves["x"], curves["val_top1_err"], "o-", label="val top-1")
    err.plot(curves["x"], curves["val_top5_err"], "o--", label="val top-5")
    err.set(title="error", xlabel="epoch", ylabel="error rate", ylim=(0, 1))
    lr.plot(curves["x"], curves["lr"], "o-", color="tab:purple")
    lr.set(title="learning rate (at epoch end)", xlabel="epoch", yscale="log")
    for ax in (loss, err, lr):
        ax.grid(alpha=0.3)
    loss.legend()
    err.legend()
    return save_figure(fig, path)


# ---------------------------------------------------------------- the command


def class_names(meta: Mapping, width: int = 24) -> list[str]:
    """Labels for the figures: each class's first name only ("great white shark" of ImageNet's "great white
    shark, white shark, man-eater, ..."), cut to ``width`` characters so that it fits beside its bar."""
    names = [
        str(c.get("name") or c.get("wnid") or c["index"]) for c in sorted(meta["classes"], key=lambda c: c["index"])
    ]
    first = [name.split(",")[0].strip() or name for name in names]
    return [name if len(name) <= width else name[: width - 1] + "…" for name in first]


@torch.no_grad()
def forward(model: torch.nn.Module, images: np.ndarray, batch_size: int, embed: bool = False) -> torch.Tensor:
    """Logits (or fc7 features) of (N, 3, H, W) network inputs, in batches."""
    fn = model.embed if embed else model
    return torch.cat([fn(torch.from_numpy(images[i : i + batch_size])) for i in range(0, len(images), batch_size)])


def visualize(cfg: Mapping[str, Any]) -> list[Path]:
    """Write the four PNGs of the module docstring into ``cfg["out"]``; returns their paths."""
    counted = ("batch_size", "predictions", "queries", "neighbours", "pool")
    sizes = {key: as_int(key, cfg[key], low=1) for key in counted}
    seed = as_int("seed", cfg["seed"], low=0)
    checkpoint_path = Path(cfg["checkpoint"])
    checkpoint = load_checkpoint(checkpoint_path)
    config = checkpoint["config"]
    data = eval_data_config(config["data"], dict(cfg["data"]), sizes["batch_size"])
    meta_names = class_names(read_meta(DataSpec.from_cfg(data).root))
    out = Path(cfg["out"])
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"out={out} cannot hold the figures ({err.strerror}): choose another out=") from None

    val = collect(data, "val", "center", sizes["predictions"], seed, key="predictions")
    model = trained_model(checkpoint_path, checkpoint, data, len(meta_names))
    batch = sizes["batch_size"]

    written = [plot_kernels(model.conv1.weight.detach().numpy(), model.columns, out / "figure3_kernels.png")]
    probs = torch.softmax(forward(model, val["images"], batch), dim=1)
    views = denormalize(val)
    written.append(plot_predictions(views, val["labels"], probs, meta_names, out / "figure4_predictions.png"))

    train = collect(data, "train", "center", sizes["pool"], seed, key="pool")
    queries = slice(0, sizes["queries"])
    neighbours = nearest(
        forward(model, val["images"][queries], batch, embed=True),
        forward(model, train["images"], batch, embed=True),
        sizes["neighbours"],
    )
    written.append(
        plot_retrieval(
            views[queries],
            val["labels"][queries],
            denormalize(train),
            train["labels"],
            neighbours,
            meta_names,
            out / "figure4_retrieval.png",
        )
    )

    metrics = Path(cfg["metrics"]) if cfg.get("metrics") else checkpoint_path.parent.parent / METRICS_FILE
    if metrics.is_file():
        written.append(plot_curves(read_curves(metrics), out / "curves.png"))
    else:
        print(f"no {metrics}: curves.png skipped (pass metrics=PATH/metrics.jsonl)", flush=True)
    return written


@hydra.main(version_base="1.3", config_path="../conf", config_name="visualize")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: bad input is one line on stderr and exit status 2."""
    try:
        written = visualize(OmegaConf.to_container(cfg, resolve=True))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    print(f"wrote {len(written)} figures to {cfg.out}: " + ", ".join(path.name for path in written), flush=True)


if __name__ == "__main__":
    run_cli(main, path_keys=("checkpoint", "data.root", "out", "metrics"))
