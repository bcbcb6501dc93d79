"""The paper's Figure 1: training error against epochs for ReLU and tanh networks, from a two-job sweep.

    python -m train.main -m +experiment=figure1 model.activation=relu,tanh [data.root=PATH]
    python -m train.figure1 [dir=multirun/figure1] [out=DIR/figure1.png] [threshold=0.25]

Reads each job's ``metrics.jsonl`` (its activation from the job's ``.hydra/config.yaml``), writes
``figure1.png`` and prints how many times sooner (in epochs) the ReLU network reaches ``threshold``
training error than the tanh one. The paper reports six times, for a four-layer net on CIFAR-10.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from preprocess.cli import EXIT_BAD_INPUT
from preprocess.config_values import as_float
from train.runlog import METRICS_FILE
from train.visualize import _pyplot, save_figure

USAGE = "usage: python -m train.figure1 [dir=multirun/figure1] [out=DIR/figure1.png] [threshold=0.25]"
STYLES = {"relu": ("tab:blue", "-", "ReLU"), "tanh": ("tab:orange", "--", "tanh")}


class Figure1Error(ValueError):
    """A sweep folder that does not hold the two runs; the message is one line naming the fix."""


def epoch_errors(metrics: Path) -> tuple[np.ndarray, np.ndarray]:
    """(epochs completed, training top-1 error) from the epoch lines of a metrics.jsonl."""
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    epochs = [line for line in lines if line.get("kind") == "epoch"]
    return np.array([e["epoch"] for e in epochs], dtype=float), np.array([e["train_top1_err"] for e in epochs])


def epochs_to_reach(epochs: np.ndarray, errors: np.ndarray, threshold: float) -> float | None:
    """The first (fractional) epoch at which the error reaches ``threshold``, interpolating linearly between
    epoch ends; None if it never does."""
    below = np.flatnonzero(errors <= threshold)
    if not len(below):
        return None
    i = int(below[0])
    if i == 0:
        return float(epochs[0])
    (x0, x1), (e0, e1) = epochs[i - 1 : i + 1], errors[i - 1 : i + 1]
    return float(x0 + (x1 - x0) * (e0 - threshold) / (e0 - e1))


def find_runs(sweep_dir: Path) -> dict[str, Path]:
    """``{activation: metrics.jsonl}`` for the jobs of a sweep folder: one job per activation."""
    found: dict[str, list[Path]] = {}
    for metrics in sorted(sweep_dir.glob(f"*/{METRICS_FILE}")):
        config = metrics.parent / ".hydra" / "config.yaml"
        if config.is_file():
            found.setdefault(str(OmegaConf.load(config).model.activation), []).append(metrics)
    several = {name: paths for name, paths in found.items() if len(paths) > 1}
    if several:
        name, paths = next(iter(several.items()))
        jobs = ", ".join(path.parent.name for path in paths)
        raise Figure1Error(
            f"{sweep_dir} holds {len(paths)} runs with model.activation={name} ({jobs}): give each comparison "
            "its own sweep folder (`train.main -m +experiment=figure1 name=figure1_b ...`, then dir=multirun/figure1_b)"
        )
    runs = {name: paths[0] for name, paths in found.items()}
    missing = sorted(set(STYLES) - set(runs))
    if missing:
        raise Figure1Error(
            f"{sweep_dir} has no finished run with model.activation={','.join(missing)}: run "
            "`python -m train.main -m +experiment=figure1 model.activation=relu,tanh` first"
        )
    return runs


def figure1(sweep_dir: str | Path, out: str | Path | None = None, threshold: float = 0.25) -> dict:
    """Write figure1.png and return the epochs each activation needed to reach ``threshold`` and their ratio."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out else sweep_dir / "figure1.png"
    out = out / "figure1.png" if out.is_dir() else out
    curves = {name: epoch_errors(path) for name, path in find_runs(sweep_dir).items()}
    reached = {name: epochs_to_reach(*curves[name], threshold) for name in STYLES}

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, (colour, style, label) in STYLES.items():
        epochs, errors = curves[name]
        ax.plot(epochs, errors, style, color=colour, lw=2, marker="o", ms=3, label=label)
    ax.axhline(threshold, color="grey", lw=1, ls=":", label=f"{threshold:.0%} training error")
    ax.set(xlabel="epochs", ylabel="training error rate", ylim=(0, 1), title="ReLU vs tanh (Figure 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)

    relu, tanh = reached["relu"], reached["tanh"]
    ratio = tanh / relu if relu and tanh else None
    last = float(curves["tanh"][0][-1]) if len(curves["tanh"][0]) else 0.0
    return {
        "relu_epochs": relu,
        "tanh_epochs": tanh,
        "ratio": ratio,
        "tanh_trained_epochs": last,
        "threshold": threshold,
        "figure": str(out),
    }


def describe(result: dict) -> str:
    """One line: how many times sooner ReLU reaches the threshold (or which run never reached it)."""
    threshold, relu, tanh = f"{result['threshold']:.0%}", result["relu_epochs"], result["tanh_epochs"]
    figure = result["figure"]
    if relu is None:
        tanh_part = "neither did tanh" if tanh is None else f"tanh did at epoch {tanh:.1f}"
        return f"ReLU never reached {threshold} training error ({tanh_part}): raise trainer.max_epochs; {figure}"
    if tanh is None:
        bound = result["tanh_trained_epochs"] / relu
        return (
            f"ReLU reached {threshold} training error at epoch {relu:.1f}; tanh did not within "
            f"{result['tanh_trained_epochs']:.0f} epochs: more than {bound:.1f} times sooner; {figure}"
        )
    if result["ratio"] < 1:
        verdict = f"tanh got there {1 / result['ratio']:.1f} times sooner than ReLU"
    else:
        verdict = f"ReLU {result['ratio']:.1f} times sooner"
    return (
        f"ReLU reached {threshold} training error at epoch {relu:.1f}, tanh at {tanh:.1f}: {verdict} "
        f"(paper: ReLU six times sooner, CIFAR-10); {figure}"
    )


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if any("=" not in arg for arg in argv) or set(args) - {"dir", "out", "threshold"}:
        print(f"error: unknown arguments {argv}; {USAGE}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        threshold = as_float("threshold", args.get("threshold", 0.25), low=0, high=1)
        result = figure1(args.get("dir", "multirun/figure1"), args.get("out"), threshold)
    except (Figure1Error, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    print(describe(result))


if __name__ == "__main__":
    main(sys.argv[1:])
