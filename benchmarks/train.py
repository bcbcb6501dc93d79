"""Throughput of train.main's training step against a bare PyTorch loop, and the data-wait fraction.

    python benchmarks/train.py [--data SHARDS] [--crop 224] [--batch 32] [--width 1.0] [--steps 10] [--rounds 3]

1. The same model (same initial weights) and the same synthetic batches, on the same cores: our step as
   train.main runs it (``train.loop.Trainer.train_epoch``: DDP wrapper, schedule, on-device metric sums, a
   synchronised log line every ``trainer.log_every`` steps) against ``zero_grad / forward / cross_entropy /
   backward / SGD step``. Rounds alternate between the two so that load from other processes hits both;
   each side's best round counts (the least disturbed on a shared machine). Target: ours within 10% of the
   bare loop (ratio >= 0.90).
2. The second epoch over the real pipeline (``data.loader``, DALI by default): the fraction of the step time the
   host spent waiting for the next batch.

Without ``--data`` the digits demo images are written and sharded at crop + 32 px in a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

# The scripts here are named like the packages they measure: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from train.config import TrainerConfig  # noqa: E402
from train.distributed import launch  # noqa: E402
from train.loop import StopSignal, Trainer  # noqa: E402
from train.main import resolve  # noqa: E402

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def demo_shards(folder: Path, image_size: int) -> Path:
    from preprocess.build_shards import build_shards
    from preprocess.demo_data import write_digits_tree

    write_digits_tree(folder / "src", limit=400, size_range=(48, 160), seed=0)
    build_shards(src=folder / "src", out=folder / "shards", image_size=image_size, shard_size=100, show_progress=False)
    return folder / "shards"


def config_for(args: argparse.Namespace, data_root: Path) -> dict:
    overrides = [
        f"data.root={data_root}",
        f"data.crop_size={args.crop}",
        f"data.batch_size={args.batch}",
        f"model.width={args.width}",
        "trainer.progress=false",
        "trainer.devices=1",
        *args.overrides,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return resolve(compose("config", overrides=overrides))


def timed(run, steps: int, batch: int, device: torch.device) -> float:
    """Images per second of ``run()`` (which does ``steps`` steps of ``batch`` images), including the device work
    it queued: on a GPU, the host runs ahead of the kernels."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return steps * batch / (time.perf_counter() - started)


def bare_loop(model: torch.nn.Module, optim_cfg: dict, batches: list, bf16: bool) -> Callable[[], None]:
    """The textbook loop (same precision as the trainer: bf16 autocast on GPU, fp32 on the CPU)."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=optim_cfg["lr"], momentum=optim_cfg["momentum"], weight_decay=optim_cfg["weight_decay"]
    )
    device_type = next(model.parameters()).device.type

    def run() -> None:
        for images, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

    return run


def benchmark(rank: int, world_size: int, config: dict, run_dir: str, args: argparse.Namespace) -> dict:
    trainer = Trainer(rank, world_size, config, Path(run_dir), StopSignal())
    bare_model = type(trainer.model)(
        num_classes=trainer.train_loader.num_classes, crop_size=args.crop, **config["model"]
    ).to(trainer.device)
    bare_model.load_state_dict(trainer.model.state_dict())
    shape = (trainer.global_batch, 3, args.crop, args.crop)
    if trainer.channels_last:
        bare_model = bare_model.to(memory_format=torch.channels_last)
    images = trainer.to_device(torch.randn(shape))
    labels = torch.randint(0, trainer.train_loader.num_classes, (shape[0],), device=trainer.device)
    batches = [(images, labels)] * args.steps
    bare = bare_loop(bare_model, config["optim"], batches, trainer.tc.bf16)
    ours = lambda: trainer.train_epoch(batches)  # noqa: E731 - the loop exactly as train.main runs it

    device = trainer.device
    timed(ours, args.steps, shape[0], device), timed(bare, args.steps, shape[0], device)  # warm-up
    rounds = [
        (timed(ours, args.steps, shape[0], device), timed(bare, args.steps, shape[0], device))
        for _ in range(args.rounds)
    ]
    ours_ips, bare_ips = max(r[0] for r in rounds), max(r[1] for r in rounds)

    for _ in range(2):  # the second epoch: DALI's start-up and first prefetch are behind us
        trainer.partial = type(trainer.partial)()
        trainer.train_epoch(trainer.train_loader)
    real = trainer.partial
    trainer.log.close()
    return {
        "ours_images_per_sec": ours_ips,
        "bare_images_per_sec": bare_ips,
        "ratio": ours_ips / bare_ips,
        "pipeline_images_per_sec": real.images / real.seconds,
        "data_wait": real.wait / real.seconds,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="shard folder (default: digits demo shards, built here)")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="images per step")
    parser.add_argument("--width", type=float, default=1.0, help="model.width")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides, e.g. data.loader=torch")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data or demo_shards(Path(tmp), args.crop + 32)
        config = config_for(args, data_root)
        backend = TrainerConfig.from_mapping(config["trainer"]).backend  # NCCL on a GPU, as train.main
        result = launch(benchmark, 1, config, str(Path(tmp) / "run"), args, backend=backend)
    print(
        f"model width {args.width}, crop {args.crop}, batch {args.batch}, {result['threads']} threads, "
        f"best of {args.rounds} rounds of {args.steps} steps"
    )
    print("| loop | images/s |\n| --- | --- |")
    print(f"| bare PyTorch (SGD, synthetic batches) | {result['bare_images_per_sec']:.1f} |")
    print(f"| train.main step (synthetic batches) | {result['ours_images_per_sec']:.1f} |")
    print(f"| train.main step, real pipeline ({config['data']['loader']}) | {result['pipeline_images_per_sec']:.1f} |")
    print(
        f"ratio ours / bare: {result['ratio']:.3f} (target >= 0.90); data wait with the real pipeline: "
        f"{result['data_wait']:.1%}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
