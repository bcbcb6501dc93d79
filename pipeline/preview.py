"""``python -m pipeline.preview data.root=PATH split=train n=32 out=DIR``: see what the network receives.

Writes ``DIR/preview.png`` (the samples de-normalised for viewing, lighting included, with label and class
name) and ``DIR/batch.npz``: ``images`` (n, 3, crop, crop) exactly as the network gets them, ``labels``,
``keys``, ``crop_x`` / ``crop_y`` (top-left of the crop in the stored image), ``flip``, ``alpha`` (n, 3) and
``offset`` (n, 3, the RGB lighting offset in 0-255 units), plus ``mean`` and ``std`` as subtracted and divided.
Every output pixel is ``(jpeg[crop_y:+crop, crop_x:+crop] (flipped) + offset - mean (same crop)) / std``.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config import DataSpec
from pipeline.lighting import mean_patch
from pipeline.loader import build_loader
from preprocess.cli import EXIT_BAD_INPUT, run_cli
from preprocess.config_values import as_int
from preprocess.shard_format import DatasetError, read_meta, temporary_path


def collect(data_cfg: dict, split: str, mode: str, n: int, seed: int, key: str = "n") -> dict[str, np.ndarray]:
    """One batch of ``n`` samples from the loader, with the draws that made it (``key``: the option that set n)."""
    root = DataSpec.from_cfg({**data_cfg, "batch_size": n}).root
    available = read_meta(root)["splits"].get(split, {}).get("count")
    if available is not None and n > available:
        raise DatasetError(f"{key}={n} is more than the {available} {split} images of {root}: lower {key}")
    loader = build_loader({**data_cfg, "batch_size": n}, split, mode, seed=seed, debug=True)
    batch = next(loader.batches())
    norm = loader.norm
    names = {int(c["index"]): str(c.get("name", c.get("wnid", c["index"]))) for c in loader.meta["classes"]}
    labels = batch["labels"].numpy()
    return {
        "images": batch["images"].float().numpy(),
        "labels": labels,
        "keys": np.asarray(batch["keys"]),
        "class_names": np.asarray([names.get(int(label), "?") for label in labels]),
        **{name: np.asarray(batch[name]) for name in ("crop_x", "crop_y", "flip", "alpha", "offset")},
        "mean": np.asarray(norm.mean, dtype=np.float64),
        "std": np.asarray(norm.std if norm.std is not None else np.ones(3)),
    }


def denormalize(batch: dict[str, np.ndarray]) -> np.ndarray:
    """(n, crop, crop, 3) uint8 for viewing: ``image * std + mean``, i.e. the augmented pixels."""
    crop = batch["images"].shape[-1]
    views = []
    for i, image in enumerate(batch["images"]):
        mean = mean_patch(batch["mean"], int(batch["crop_x"][i]), int(batch["crop_y"][i]), crop, bool(batch["flip"][i]))
        views.append(image * batch["std"][:, None, None] + mean)
    return np.clip(np.rint(np.stack(views)), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def save_grid(path: Path, batch: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = denormalize(batch)
    cols = min(8, len(views))
    rows = math.ceil(len(views) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, view, label, name in zip(axes.flat, views, batch["labels"], batch["class_names"], strict=False):
        ax.imshow(view)
        ax.set_title(f"{label}: {name}"[:24], fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def save_figure(fig, path: Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure under a temporary name, rename it when complete, and close it."""
    import matplotlib.pyplot as plt

    tmp = temporary_path(path)
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_npz(path: Path, batch: dict[str, np.ndarray]) -> None:
    tmp = temporary_path(path, ".npz")
    np.savez(tmp, **batch)
    os.replace(tmp, path)


def preview(data_cfg: dict, split: str, n: int, out: str | Path, seed: int = 0, mode: str | None = None) -> Path:
    """Write ``out/preview.png`` and ``out/batch.npz``; returns ``out``."""
    mode = mode or ("train" if split == "train" else "center")
    if mode not in ("train", "center"):
        raise DatasetError(f"mode={mode!r}: the preview shows train or center batches")
    batch = collect(data_cfg, split, mode, n, seed)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"out={out} cannot hold the preview ({err.strerror}): choose another out=") from None
    save_npz(out / "batch.npz", batch)
    save_grid(out / "preview.png", batch)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="preview")
def main(cfg: DictConfig) -> None:
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        n, seed = as_int("n", cfg.n, low=1), as_int("seed", cfg.seed, low=0)
        out = preview(data, cfg.split, n, cfg.out, seed=seed, mode=cfg.mode)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(f"wrote {out / 'preview.png'} and {out / 'batch.npz'} ({cfg.n} {cfg.split} samples)")


if __name__ == "__main__":
    run_cli(main, path_keys=("data.root", "out"))
