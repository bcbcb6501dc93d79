"""The training worker of one rank: epochs of DDP steps, validation, checkpoints, resume, the final summary.

``train_worker(rank, world_size, config, run_dir)`` is what ``train.distributed.launch`` runs in every rank;
``config`` is the whole resolved config (a plain dict). Rank 0 returns the final validation top-1 error.

The step does no host synchronisation: loss, correct counts and a non-finite flag accumulate on the device
and are all-reduced every ``trainer.log_every`` steps (and at the end of an epoch), which is when the host
waits, writes a metrics line, checks for NaN/inf and asks every rank whether a stop signal arrived (all ranks
must agree to stop at the same step, or the others would hang in the next all-reduce).
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.loader import build_loader
from preprocess.cli import EXIT_BAD_INPUT
from preprocess.shard_format import DatasetError, dataset_fingerprint, write_json_atomic
from train.checkpoint import (
    CheckpointError,
    capture_rng,
    copy_checkpoint,
    load_checkpoint,
    restore_rng,
    resume_conflicts,
    save_checkpoint,
)
from train.config import ConfigError, TrainerConfig, check_batch
from train.distributed import FORWARDED_SIGNALS, StopRun, chained_signal_handlers, worker_device
from train.metrics import count_correct, errors_from_counts, multi_crop_name, patches_used, tencrop_probs
from train.model import AlexNet, check_model
from train.optim import build_optimizer
from train.runlog import SUMMARY_FILE, RunLog
from train.schedule import build_schedule

EXIT_DIVERGED = 1
USER_ERRORS = (DatasetError, ConfigError, CheckpointError)
CHECKPOINT_DIR = "checkpoints"


class StopSignal:
    """Remembers the first stop signal (``FORWARDED_SIGNALS``, or Ctrl-C) received; acted on at the next
    synchronisation point. A second Ctrl-C, or one once training is over (``training_done``: nothing left to
    checkpoint), interrupts at once.

    Only the process that installed it acts: forked DataLoader workers inherit the handler and get the terminal's
    Ctrl-C too; they leave stopping to the trainer."""

    def __init__(self) -> None:
        self.signum = 0
        self.training_done = False
        self.owner = os.getpid()

    def __call__(self, signum: int, _frame: object) -> None:
        if os.getpid() != self.owner:
            return
        if signum == signal.SIGINT and (self.signum or self.training_done):
            raise KeyboardInterrupt
        if signum == signal.SIGINT and os.environ.get("RANK", "0") == "0":
            print("\nCtrl-C: stopping at the next log point with a checkpoint (Ctrl-C again: at once)", flush=True)
        self.signum = self.signum or signum


@contextmanager
def catching_stop_signals() -> Iterator[StopSignal]:
    """Record ``FORWARDED_SIGNALS`` (SIGTERM, SIGUSR2, SIGUSR1) while inside, and Ctrl-C where it reaches this
    process (a rank run in the launching process, or torchrun's, which share the terminal; spawned ranks ignore it
    and get SIGTERM from their parent).
    On leaving, an outer Python handler (e.g. submitit's requeue) still gets the signal, after our checkpoint; a
    Ctrl-C that came too late to be acted on ends the command (and a sweep) as an interrupt."""
    stop = StopSignal()
    interrupt = () if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else (signal.SIGINT,)
    with chained_signal_handlers(FORWARDED_SIGNALS + interrupt, stop):
        yield stop
    if stop.signum == signal.SIGINT:
        raise KeyboardInterrupt


def train_worker(rank: int, world_size: int, config: dict[str, Any], run_dir: str) -> float:
    """Train on this rank (see the module docstring); user errors end the run as a one-line ``StopRun``."""
    with catching_stop_signals() as stop:
        try:
            trainer = Trainer(rank, world_size, config, Path(run_dir), stop)
            return trainer.fit()
        except USER_ERRORS as err:
            raise StopRun(str(err), EXIT_BAD_INPUT) from None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_model(config: dict[str, Any], num_classes: int) -> AlexNet:
    """AlexNet(num_classes from meta.json, crop_size from data.crop_size, **config["model"])."""
    return AlexNet(num_classes=num_classes, crop_size=int(config["data"]["crop_size"]), **check_model(config["model"]))


@dataclass
class Sums:
    """Global (all-rank) totals over a stretch of training: an epoch, or the part of it done so far."""

    loss: float = 0.0
    correct: float = 0.0
    images: int = 0
    wait: float = 0.0  # seconds waited for data: the ranks' mean wait fraction times this rank's seconds
    seconds: float = 0.0

    def add(self, other: Sums) -> None:
        for name in ("loss", "correct", "images", "wait", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class Window:
    """What accumulates between two synchronisation points: on the device (no host sync) plus host timers."""

    device_sums: torch.Tensor  # [loss * batch, top-1 correct, non-finite losses]
    steps: int = 0
    wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)


class Trainer:
    """Everything one rank holds during a run; ``fit()`` runs it."""

    def __init__(self, rank: int, world_size: int, config: dict[str, Any], run_dir: Path, stop: StopSignal):
        self.rank, self.world_size, self.config, self.run_dir, self.stop = rank, world_size, config, run_dir, stop
        self.tc = tc = TrainerConfig.from_mapping(config["trainer"])
        check_batch(config["data"], world_size)
        self.device = worker_device(tc.backend)
        self.global_batch = int(config["data"]["batch_size"])
        self.channels_last = tc.channels_last and self.device.type == "cuda"
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = tc.cudnn_benchmark
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

        seed_everything(tc.seed)  # the same initial weights on every rank
        self.loader_args = dict(rank=rank, world_size=world_size, seed=tc.seed, device=self.device)
        self.train_loader = build_loader(config["data"], "train", "train", **self.loader_args)
        self.val_loader = build_loader(config["data"], "val", "center", **self.loader_args)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"the train split gives no full batch of {self.global_batch // world_size} per rank: "
                "lower data.batch_size"
            )
        self.model = build_model(config, self.train_loader.num_classes).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        self.net: nn.Module = torch.compile(ddp) if tc.compile else ddp
        try:
            self.optimizer = build_optimizer(self.model, config["optim"], batch_size=self.global_batch)
            self.schedule = build_schedule(
                self.optimizer, config["schedule"], steps_per_epoch=self.steps_per_epoch, max_epochs=tc.max_epochs
            )
        except (ValueError, TypeError, KeyError) as err:
            raise ConfigError(f"optim/schedule config: {err}") from None
        seed_everything(tc.seed + 1 + rank)  # dropout: a different stream on every rank

        self.epoch = self.step = self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_val_top1_err = math.inf
        self.partial = Sums()  # the epoch in progress
        self.done = Sums()  # all finished epochs
        self.wall_before = 0.0
        self.session_start = time.perf_counter()
        self.resumed_from = self.resume_path()
        if self.resumed_from is not None:
            self.load(self.resumed_from)
        self.log = RunLog(
            run_dir, enabled=rank == 0, resume_step=self.step, max_epochs=tc.max_epochs, progress=tc.progress
        )

    # ---- the run ---------------------------------------------------------------------------------------------

    @property
    def training_complete(self) -> bool:
        """All epochs done, or the schedule's last plateau reached: only the final evaluation is left."""
        return self.epoch >= self.tc.max_epochs or self.schedule.should_stop

    def fit(self) -> float:
        try:
            if self.resumed_from is not None and self.training_complete:
                self.log.info(f"{self.resumed_from}: training is complete ({self.epoch} epochs); evaluating it again")
            elif self.resumed_from is not None:
                self.log.info(f"resumed from {self.resumed_from} at epoch {self.epoch + 1}, step {self.step}")
            while not self.training_complete:
                self.train_epoch(self.train_loader)
                self.end_epoch()
            return self.finish()["val_top1_err"]
        finally:
            self.log.close()

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """One epoch (or what is left of it) over ``batches``; acts on stop signals at synchronisation points."""
        self.model.train()
        self.log.start_epoch(
            self.epoch, self.steps_per_epoch * self.global_batch, self.step_in_epoch * self.global_batch
        )
        window = self.new_window()
        iterator = iter(batches)
        while True:
            waited = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            window.wait += time.perf_counter() - waited
            lr = self.schedule.step(self.epoch, self.step_in_epoch)
            loss, logits, labels = self.train_step(*batch)
            window.device_sums += torch.stack(
                [
                    loss.double() * labels.shape[0],
                    count_correct(logits, labels, ks=(1,))[0].double(),
                    (~loss.isfinite()).double(),
                ]
            )
            window.steps += 1
            self.step += 1
            self.step_in_epoch += 1
            self.log.advance(self.global_batch)
            if self.step % self.tc.log_every == 0 and self.step_in_epoch < self.steps_per_epoch:
                window = self.new_window(start=self.sync(window, lr))
                self.stop_if_signalled()
        if window.steps:
            self.sync(window, self.optimizer.param_groups[0]["lr"])
        self.log.end_epoch()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward, backward, optimizer step; returns the detached loss and logits (still on the device)."""
        images = self.to_device(images)
        labels = labels.to(self.device, torch.int64, non_blocking=True)
        with self.autocast():
            logits = self.net(images)
            loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), logits.detach(), labels

    def end_epoch(self) -> None:
        """Validate, step the schedule, log the epoch, checkpoint; then honour a stop signal."""
        started = time.perf_counter()
        val_top1_err, val_top5_err = self.evaluate(self.val_loader)
        self.schedule.end_epoch(self.epoch, val_top1_err)
        sums = self.partial
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": sums.loss / sums.images,
            "train_top1_err": 1.0 - sums.correct / sums.images,
            "val_top1_err": val_top1_err,
            "val_top5_err": val_top5_err,
            "images_per_sec": sums.images / sums.seconds,
            "data_wait": sums.wait / sums.seconds,
            "seconds": sums.seconds + time.perf_counter() - started,
        }
        self.history.append(record)
        is_best = val_top1_err < self.best_val_top1_err
        self.best_val_top1_err = min(self.best_val_top1_err, val_top1_err)
        self.done.add(sums)
        self.partial = Sums()
        self.epoch += 1
        self.step_in_epoch = 0
        self.log.epoch(record)
        self.save(best=is_best)
        self.stop_if_signalled()

    def finish(self) -> dict[str, Any]:
        """Ten-crop evaluation of the final weights and summary.json."""
        self.stop.training_done = True  # the checkpoint is written: a Ctrl-C from here on stops at once
        last = self.history[-1]
        tencrop = [None, None]
        if self.tc.tencrop:
            loader = build_loader(self.config["data"], "val", "tencrop", **self.loader_args)
            tencrop = self.evaluate(loader, tencrop=True)
        summary = {
            "val_top1_err": last["val_top1_err"],
            "val_top5_err": last["val_top5_err"],
            "tencrop_top1_err": tencrop[0],
            "tencrop_top5_err": tencrop[1],
            "best_val_top1_err": self.best_val_top1_err,
            "epochs": self.epoch,
            "wall_seconds": self.wall_seconds(),
            "images_per_sec": self.done.images / self.done.seconds if self.done.seconds else None,
        }
        if self.rank == 0:
            write_json_atomic(self.run_dir / SUMMARY_FILE, summary)
            name = multi_crop_name([patches_used(self.config["data"])])
            crops = f", {name} {tencrop[0]:.2%} / {tencrop[1]:.2%}" if self.tc.tencrop else ""
            self.log.info(
                f"done: {self.epoch} epochs in {summary['wall_seconds']:.0f} s; val err top-1 / top-5 "
                f"{last['val_top1_err']:.2%} / {last['val_top5_err']:.2%}{crops}; {self.run_dir / SUMMARY_FILE}"
            )
        return summary

    # ---- steps, synchronisation, evaluation ------------------------------------------------------------------

    def new_window(self, start: float | None = None) -> Window:
        """A window from ``start`` (default: now). Windows chain from the moment the previous sync began: on a GPU
        the host runs ahead of the device and catches up inside the sync, time no window would count otherwise."""
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        return Window(sums) if start is None else Window(sums, start=start)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Images on the device (channels_last when set); a float16/bfloat16 ``data.dtype`` is widened to the fp32
        weights' dtype unless bf16 autocast is on, which casts the inputs itself."""
        images = images.to(self.device, non_blocking=True)
        if not self.tc.bf16:
            images = images.float()
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.tc.bf16)

    def sync(self, window: Window, lr: float) -> float:
        """All-reduce a window's sums (the host waits here), stop on NaN/inf, write a step line; returns the time
        the sync began (where the next window starts)."""
        # each rank's wait as a fraction of its own window: ranks' windows start and end at slightly different
        # times, so averaging raw seconds could exceed this rank's window (a data_wait above 1)
        began = time.perf_counter()
        seconds = began - window.start
        fraction = torch.tensor([window.wait / seconds], dtype=torch.float64, device=self.device)
        totals = torch.cat([window.device_sums, fraction])
        dist.all_reduce(totals)
        loss, correct, nonfinite, wait_fraction = totals.tolist()
        if nonfinite:
            kept = self.run_dir / CHECKPOINT_DIR / "last.pt"
            kept = f"the last good checkpoint is {kept}" if kept.is_file() else "no checkpoint was written yet"
            raise StopRun(
                f"the loss became NaN or infinite by epoch {self.epoch + 1} step {self.step} (lr {lr:.3g}): training "
                f"diverged; {kept}; lower optim.lr or add schedule.warmup_epochs",
                EXIT_DIVERGED,
            )
        sums = Sums(loss, correct, window.steps * self.global_batch, wait_fraction / self.world_size * seconds, seconds)
        self.partial.add(sums)
        self.log.step(
            {
                "epoch": self.epoch + 1,
                "step": self.step,
                "lr": lr,
                "loss": loss / sums.images,
                "train_top1_err": 1.0 - correct / sums.images,
                "images_per_sec": sums.images / sums.seconds,
                "data_wait": sums.wait / sums.seconds,
            }
        )

    def stop_if_signalled(self) -> None:
        """If any rank got a stop signal or Ctrl-C, all save a checkpoint here and stop together."""
        flag = torch.tensor([self.stop.signum], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if not signum:
            return
        if self.step_in_epoch:  # mid-epoch; at an epoch end the checkpoint was just written
            self.save(best=False)
            dist.barrier()  # rank 0 is writing: once a rank exits, the launcher kills those still running soon after
        where = self.run_dir / CHECKPOINT_DIR / "last.pt"
        again = "the same command again" if self.tc.resume == "auto" else f"the command with trainer.resume={where}"
        raise StopRun(
            f"stopped by {signal.Signals(signum).name} at epoch {self.epoch + (1 if self.step_in_epoch else 0)}, "
            f"step {self.step}: checkpoint {where} saved; run {again} to resume",
            128 + signum,
        )

    @torch.no_grad()
    def evaluate(self, loader: Iterable, tencrop: bool = False) -> list[float]:
        """Top-1 and top-5 error over the whole split: counts summed over ranks, every sample once."""
        self.model.eval()
        counts = torch.zeros(3, dtype=torch.int64, device=self.device)
        for images, labels in loader:
            labels = labels.to(self.device, torch.int64, non_blocking=True)
            with self.autocast():
                if tencrop:
                    images = images[:, : patches_used(self.config["data"])]
                    batch, crops = images.shape[:2]
                    scores = tencrop_probs(self.model(self.to_device(images.flatten(0, 1))).view(batch, crops, -1))
                else:
                    scores = self.model(self.to_device(images))
            counts[:2] += count_correct(scores.float(), labels)
            counts[2] += labels.shape[0]
        dist.all_reduce(counts)
        self.model.train()
        top1, top5, total = counts.tolist()
        return errors_from_counts([top1, top5], total)

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def resume_path(self) -> Path | None:
        """trainer.resume: auto = checkpoints/last.pt of the run dir if it exists; never; or a file path."""
        if self.tc.resume == "never":
            return None
        if self.tc.resume == "auto":
            last = self.run_dir / CHECKPOINT_DIR / "last.pt"
            return last if last.is_file() else None
        return Path(self.tc.resume)

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.session_start

    def save(self, best: bool) -> None:
        """Gather every rank's random and loader states; rank 0 writes last.pt (and best.pt) atomically."""
        states: list[Any] = [None] * self.world_size
        dist.all_gather_object(states, {"rng": capture_rng(self.device), "loader": self.train_loader.state_dict()})
        if self.rank != 0:
            return
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "step_in_epoch": self.step_in_epoch,
            "rng": [state["rng"] for state in states],
            "loader": [state["loader"] for state in states],
            "config": self.config,
            "dataset": dataset_fingerprint(self.train_loader.meta),
            "image_size": int(self.train_loader.meta["settings"]["image_size"]),
            "metrics": {
                "history": self.history,
                "best_val_top1_err": self.best_val_top1_err,
                "partial": vars(self.partial).copy(),
                "done": vars(self.done).copy(),
                "wall_seconds": self.wall_seconds(),
            },
        }
        last = self.run_dir / CHECKPOINT_DIR / "last.pt"
        save_checkpoint(last, checkpoint)
        if best:
            copy_checkpoint(last, last.with_name("best.pt"))

    def load(self, path: Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, counters, this rank's loader and RNG."""
        checkpoint = load_checkpoint(path, resuming=path == self.run_dir / CHECKPOINT_DIR / "last.pt")
        conflicts = resume_conflicts(checkpoint["config"], self.config)
        dataset = dataset_fingerprint(self.train_loader.meta)
        if checkpoint.get("dataset", dataset) != dataset:  # checkpoints from before the fingerprint: not checked
            conflicts.insert(0, f"data.root={self.config['data']['root']} holds other shards than it was trained on")
        if conflicts:
            raise CheckpointError(
                f"checkpoint {path} is another run ({'; '.join(conflicts[:3])}): resume it with its own settings, "
                "or start a new run (another name= or hydra.run.dir=, or trainer.resume=never)"
            )
        try:
            self.model.load_state_dict(checkpoint["model"])
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            self.schedule.load_state_dict(checkpoint["schedule"])
        except (RuntimeError, ValueError, KeyError) as err:
            reason = str(err).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {path} does not fit this config ({reason}): keep model/optim/schedule as in that run, "
                "or use trainer.resume=never"
            ) from None
        self.epoch, self.step = int(checkpoint["epoch"]), int(checkpoint["step"])
        ranks = len(checkpoint["loader"])
        if ranks == self.world_size:
            self.train_loader.load_state_dict(checkpoint["loader"][self.rank])
            restore_rng(checkpoint["rng"][self.rank], self.device)
        elif not self.training_complete:  # a finished run is only evaluated again, by any number of ranks
            raise CheckpointError(
                f"checkpoint {path} was written by {ranks} ranks, this run has {self.world_size}: "
                f"use trainer.devices={ranks}"
            )
        self.step_in_epoch = int(checkpoint["step_in_epoch"])
        metrics = checkpoint["metrics"]
        self.history = list(metrics["history"])
        self.best_val_top1_err = float(metrics["best_val_top1_err"])
        self.partial, self.done = Sums(**metrics["partial"]), Sums(**metrics["done"])
        self.wall_before = float(metrics["wall_seconds"])
