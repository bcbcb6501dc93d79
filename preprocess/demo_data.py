"""A small real-image dataset that needs no download: scikit-learn's handwritten digits as an ImageFolder tree.

The 1,797 8x8 scans of ``sklearn.datasets.load_digits`` (10 classes) are upscaled to ImageNet-like sizes,
given a random ink and paper colour and a little sensor noise, and written as JPEG files in the
``train/<wnid>/<wnid>_<n>.JPEG`` layout that ``preprocess.build_shards`` reads. Colours vary per image, so
the RGB covariance is full-rank and the network has to learn shapes, not colours.

    python -m preprocess.demo_data out=data/digits-src
"""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

CLASS_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SYNSET_FILE = "LOC_synset_mapping.txt"


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
    """Write the digits as ``out/{train,val}/<wnid>/<wnid>_<n>.JPEG`` plus a class-name file; returns counts."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))[:limit]
    n_val = int(round(len(order) * val_fraction))
    out = Path(out)
    counts = {"train": 0, "val": 0}
    for position, index in enumerate(order):
        split = "val" if position < n_val else "train"
        wnid = digit_wnid(int(digits.target[index]))
        image = render_digit(digits.images[index], rng, size_range)
        path = out / split / wnid / f"{wnid}_{index}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        path.write_bytes(encoded.tobytes())
        counts[split] += 1
    (out / SYNSET_FILE).write_text("".join(f"{digit_wnid(d)} {name}\n" for d, name in enumerate(CLASS_NAMES)))
    return counts


def main(argv: list[str]) -> None:
    usage = "usage: python -m preprocess.demo_data out=DIR [seed=0] [limit=N]"
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if any("=" not in arg for arg in argv) or "out" not in args or set(args) - {"out", "seed", "limit"}:
        sys.exit(usage)
    try:
        seed, limit = int(args.get("seed", 0)), int(args["limit"]) if "limit" in args else None
    except ValueError:
        sys.exit(usage)
    counts = write_digits_tree(args["out"], seed=seed, limit=limit)
    print(f"wrote {counts['train']} train and {counts['val']} val digit images to {args['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
