"""A small real-image dataset that needs no download: scikit-learn's handwritten digits as an ImageFolder tree.

The 1,797 8x8 scans of ``sklearn.datasets.load_digits`` (10 classes) are upscaled to ImageNet-like sizes,
given a random ink and paper colour and a little sensor noise, and written as JPEG files in the
``train/<wnid>/<wnid>_<n>.JPEG`` layout that ``preprocess.build_shards`` reads. Colours vary per image, so
the RGB covariance is full-rank and the network has to learn shapes, not colours.

    python -m preprocess.demo_data out=data/digits-src [seed=0] [limit=N]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

from preprocess.cli import EXIT_BAD_INPUT
from preprocess.config_values import as_int, as_optional_int
from preprocess.shard_format import DatasetError, write_bytes_atomic, write_json_atomic, write_text_atomic

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SYNSET_FILE = "LOC_synset_mapping.txt"
SETTINGS_FILE = "demo_data.json"
USAGE = "usage: python -m preprocess.demo_data out=DIR [seed=0] [limit=N]"


def digit_wnid(digit: int) -> str:
    """A WordNet-id-shaped folder name for a digit class: ``d0`` ... ``d9``."""
    return f"d{digit}"


def render_digit(scan: np.ndarray, rng: np.random.Generator, size_range: tuple[int, int]) -> np.ndarray:
    """One 8x8 scan (0-16) as a coloured RGB uint8 image of a random size within ``size_range``."""
    height, width = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
    ink = cv2.resize((scan / 16.0).astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    ink = np.clip(ink, 0.0, 1.0)[..., None]
    paper, pen = rng.uniform(0, 255, size=(2, 3))
    image = paper * (1.0 - ink) + pen * ink + rng.normal(0.0, 6.0, size=(height, width, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_digits_tree(
    out: str | Path,
    val_fraction: float = 0.2,
    size_range: tuple[int, int] = (96, 160),
    seed: int = 0,
    limit: int | None = None,
    quality: int = 90,
) -> dict[str, int]:
    """Write the digits as ``out/{train,val}/<wnid>/<wnid>_<n>.JPEG`` plus a class-name file; returns counts.

    ``out`` must be new, empty, or a tree written with the same settings (``demo_data.json`` records them, so an
    interrupted run can be finished): another seed or limit would mix two draws, putting val images in train.
    Each file is written under a temporary name, then renamed.
    """
    from sklearn.datasets import load_digits

    out = Path(out)
    settings = dict(seed=seed, limit=limit, val_fraction=val_fraction, size_range=list(size_range), quality=quality)
    _claim(out, settings)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:limit]
    n_val = int(round(len(order) * val_fraction))
    counts = {"train": 0, "val": 0}
    for position, index in enumerate(order):
        split = "val" if position < n_val else "train"
        wnid = digit_wnid(int(digits.target[index]))
        image = render_digit(digits.images[index], rng, size_range)
        path = out / split / wnid / f"{wnid}_{index}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        write_bytes_atomic(path, encoded.tobytes())
        counts[split] += 1
    write_text_atomic(out / SYNSET_FILE, "".join(f"{digit_wnid(d)} {name}\n" for d, name in enumerate(CLASS_NAMES)))
    return counts


def _claim(out: Path, settings: dict) -> None:
    """Record ``settings`` in a new or empty ``out``; accept an ``out`` that recorded the same ones."""
    marker = out / SETTINGS_FILE
    if out.is_dir() and any(out.iterdir()):
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != settings:
            what = f"digits written with {recorded}" if recorded else "other files"
            raise DatasetError(f"out={out} already holds {what}: choose a new out= folder or delete this one")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, settings)


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    try:
        if any("=" not in arg for arg in argv) or "out" not in args or set(args) - {"out", "seed", "limit"}:
            raise DatasetError(f"unknown or missing arguments {argv}: {USAGE}")
        seed = as_int("seed", args.get("seed", 0), low=0)
        limit = as_optional_int("limit", args.get("limit"), low=1)
        counts = write_digits_tree(args["out"], seed=seed, limit=limit)
    except OSError as err:
        reason = err.strerror or str(err)
        print(f"error: out={args['out']} cannot be written ({reason}): choose another out=", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(f"wrote {counts['train']} train and {counts['val']} val digit images to {args['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
