"""The whole system on a small embedded dataset, in one command and a few minutes on two CPU cores.

    python -m train.demo [out=data/demo] [devices=2]

It runs, and prints, the same commands a user runs on ImageNet:

1. ``preprocess.demo_data``  scikit-learn's 1,797 handwritten digits (10 classes) as coloured JPEG files
2. ``preprocess.build_shards``  -> 128x128 WebDataset shards, pixel mean and RGB PCA
3. ``train.main +experiment=demo``  AlexNet (narrow) on two worker processes
4. ``train.evaluate``  centre-crop and ten-crop validation error
5. ``train.visualize``  the paper's Figures 3 and 4 and the training curves

Each step is skipped when its output is already complete, so an interrupted demo resumes.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from preprocess.cli import EXIT_BAD_INPUT
from preprocess.shard_format import META_FILE

DEMO_IMAGE_SIZE = 128
DEMO_DEVICES = "2"  # conf/experiment/demo.yaml's trainer.devices


def demo_run_dir(devices: str) -> Path:
    """Where train.main writes the demo run: Hydra's name for it, a folder per rank count (each is its own run)."""
    return Path("outputs/demo") / ("default" if devices == DEMO_DEVICES else f"trainer.devices={devices}")


def run(command: list[str]) -> None:
    """Run one step as a user would type it; stop the demo with that step's exit status if it fails.

    A Ctrl-C reaches the step too (same terminal), which stops cleanly (training saves a checkpoint first), so
    the demo ignores it and waits: ``subprocess.run`` would kill the step a quarter of a second later.
    """
    print(f"\n$ {shlex.join(command)}", flush=True)
    step = subprocess.Popen(command)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = step.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # Ctrl-C, or the step was sent SIGTERM
        print("demo: interrupted; run it again to continue where it stopped", file=sys.stderr)
        sys.exit(status)
    if status != 0:
        sys.exit(f"demo: step failed with exit status {status}: {shlex.join(command)}")


def main(argv: list[str]) -> None:
    if {"-h", "--help"} & set(argv):
        print(__doc__)
        return
    args = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    if any("=" not in arg for arg in argv) or set(args) - {"out", "devices"}:
        print(f"error: unknown arguments {argv}: the demo takes out=DIR and devices=N (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    out = Path(args.get("out", "data/demo"))
    devices = args.get("devices", DEMO_DEVICES)
    run_dir = demo_run_dir(devices)  # passed to train.main, so the later steps find it whatever Hydra's naming
    src, shards = out / "src", out / "shards"
    py = sys.executable
    started = time.time()

    if not (src / "LOC_synset_mapping.txt").is_file():
        run([py, "-m", "preprocess.demo_data", f"out={src}"])
    if not (shards / META_FILE).is_file():
        run([py, "-m", "preprocess.build_shards", f"src={src}", f"out={shards}", f"image_size={DEMO_IMAGE_SIZE}"])
    train = [py, "-m", "train.main", "+experiment=demo", f"data.root={shards}", f"trainer.devices={devices}"]
    run([*train, f"hydra.run.dir={run_dir}"])
    checkpoint = run_dir / "checkpoints" / "best.pt"
    run([py, "-m", "train.evaluate", f"checkpoint={checkpoint}", f"data.root={shards}", f"out={run_dir / 'eval.json'}"])
    run([py, "-m", "train.visualize", f"checkpoint={checkpoint}", f"data.root={shards}", f"out={run_dir / 'figures'}"])

    result = json.loads((run_dir / "eval.json").read_text())
    chance = 1 - 1 / 10
    patches = result["per_model"][0]["patches"]  # 5: no mirrored patches for a model trained without flips
    print(
        f"\ndemo done in {time.time() - started:.0f} s: validation top-1 error {result['top1_err']:.1%} centre crop, "
        f"{result['tencrop_top1_err']:.1%} with {patches} patches (chance: {chance:.0%}) on {result['count']} images; "
        f"figures in {run_dir / 'figures'}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
