"""What a run reports: metrics.jsonl, TensorBoard events, the console (a tqdm bar per epoch, a line per epoch).

Only rank 0 writes; on other ranks ``RunLog(enabled=False)`` does nothing. Record formats (``epoch`` counts
from 1, ``step`` is the number of optimizer steps done so far)::

    {"kind": "step", "epoch", "step", "lr", "loss", "train_top1_err", "images_per_sec", "data_wait"}
    {"kind": "epoch", "epoch", "step", "lr", "loss", "train_top1_err", "val_top1_err", "val_top5_err",
     "images_per_sec", "data_wait", "seconds"}

On resume, lines logged after the checkpoint's step (a run killed after its last checkpoint) are dropped
from metrics.jsonl and TensorBoard is told to purge them, so both read as one uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from preprocess.shard_format import write_text_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"
STEP_SCALARS = ("loss", "train_top1_err", "lr", "images_per_sec", "data_wait")
EPOCH_SCALARS = (*STEP_SCALARS, "val_top1_err", "val_top5_err", "seconds")


def format_epoch_line(record: dict[str, Any], max_epochs: int) -> str:
    """The one console line per epoch."""
    return (
        f"epoch {record['epoch']}/{max_epochs} | loss {record['loss']:.4f} | train err {record['train_top1_err']:.2%}"
        f" | val err top-1 {record['val_top1_err']:.2%} top-5 {record['val_top5_err']:.2%} | lr {record['lr']:.3g}"
        f" | {record['images_per_sec']:.0f} img/s | data wait {record['data_wait']:.1%} | {record['seconds']:.1f} s"
    )


def _logged_step(line: str) -> int | None:
    """The ``step`` of a metrics line, or None for a line torn by a kill in the middle of writing it."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of ``path`` whose ``step`` is past ``step``, and torn ones (rewritten atomically)."""
    if not path.is_file():
        return
    lines = [
        line for line in path.read_text().splitlines() if (logged := _logged_step(line)) is not None and logged <= step
    ]
    write_text_atomic(path, "".join(line + "\n" for line in lines))


class RunLog:
    """metrics.jsonl + TensorBoard + console for rank 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int, max_epochs: int, progress: bool):
        self.enabled = enabled
        self.max_epochs = max_epochs
        self.progress = progress and enabled
        self.bar: tqdm | None = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = run_dir / METRICS_FILE
        truncate_after(self.metrics_path, resume_step)
        self.metrics = open(self.metrics_path, "a")  # noqa: SIM115 - open for the whole run, closed in close()
        # TensorBoard hides the events at and after purge_step: keep the checkpoint's step, as metrics.jsonl does
        self.tensorboard = SummaryWriter(
            str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None
        )

    def _write(self, record: dict[str, Any], scalars: tuple[str, ...], prefix: str) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        for key in scalars:
            self.tensorboard.add_scalar(f"{prefix}/{key}", record[key], record["step"])

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "step", **record}, STEP_SCALARS, "step")
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", err=f"{record['train_top1_err']:.1%}", refresh=False)

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "epoch", **record}, EPOCH_SCALARS, "epoch")
        self.tensorboard.flush()
        self.info(format_epoch_line(record, self.max_epochs))

    def start_epoch(self, epoch: int, total_images: int, done_images: int) -> None:
        """A bar over this epoch's images: its rate is images/s, with an ETA."""
        self.end_epoch()
        if self.progress:
            self.bar = tqdm(
                total=total_images,
                initial=done_images,
                desc=f"epoch {epoch + 1}/{self.max_epochs}",
                unit="img",
                unit_scale=True,
                dynamic_ncols=True,
                mininterval=1.0,
                leave=False,
            )

    def advance(self, images: int) -> None:
        if self.bar is not None:
            self.bar.update(images)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def info(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line)

    def close(self) -> None:
        if self.enabled:
            self.end_epoch()
            self.metrics.close()
            self.tensorboard.close()
