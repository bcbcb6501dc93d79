"""Start data-parallel workers and get rank 0's result back: spawned locally, or under torchrun.

``launch(worker, world_size, *args)`` calls ``worker(rank, world_size, *args)`` in every rank with the
default process group initialised, and returns what rank 0's call returned:

- under torchrun (``TORCHELASTIC_RUN_ID`` or ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set) it runs the worker
  in this process with torchrun's environment, one or several nodes; ``world_size`` is then torchrun's;
- with ``world_size == 1`` it runs the worker in this process (no spawn cost) on a fresh local port;
- otherwise it spawns ``world_size`` processes (``spawn`` start method, so nothing of the parent's state
  leaks in: pass everything the worker needs, resolved and picklable, in ``args``), each on a fresh port,
  so that jobs of a Hydra sweep run one after another in the same parent never meet a stale rendezvous.

The parent watches its children: SIGTERM, SIGUSR2 and SIGUSR1 (a scheduler's warning before preemption or the
time limit: SIGUSR2 is submitit's, SIGUSR1 older submitit's; see ``FORWARDED_SIGNALS``) are forwarded to them,
Ctrl-C is forwarded as SIGTERM (a second Ctrl-C kills them; the workers' stop for that SIGTERM is reported as
the Ctrl-C, status 130); when one child fails, the others get ``grace_s`` seconds (a gloo peer that lost its
partner fails at once; one stuck elsewhere does not) and are then killed, so a dead worker never leaves the rest
hanging; when the parent itself is killed (SIGKILL), its children stop as for a SIGTERM. Process groups are
created with a ``timeout_s`` collective timeout.

A worker ends a run with a one-line message and an exit status by raising ``StopRun``: the launcher carries it
from whichever rank raised it (rank 0's first) to the parent and re-raises it there, without a traceback. A
rank that dies otherwise (an exception, a signal, ``os._exit``) becomes ``StopRun("worker rank R ...", 1)`` in
the parent: the rank's own traceback is the only one printed.

Helpers for code that runs inside a worker: ``worker_device(backend)`` (the rank's torch device),
``is_torchrun()``, ``local_world_size()``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.config import ranks_on_this_node
from preprocess.cli import EXIT_BAD_INPUT


def _stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM (kill, scancel) and the warning SLURM sends before preemption or the time limit: submitit asks for
    ``$SUBMITIT_PREEMPT_SIGNAL`` (default USR2, since 2022: NCCL may catch USR1); older submitit and many
    hand-written sbatch scripts use USR1."""
    named = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)
    return tuple(dict.fromkeys((signal.SIGTERM, named, signal.SIGUSR2, signal.SIGUSR1)))


FORWARDED_SIGNALS = _stop_signals()  # each stops training with a checkpoint


class StopRun(Exception):
    """Ends a run with a one-line ``message`` and a process ``exit_code``, printed without a traceback."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def default_backend() -> str:
    """NCCL when a GPU is visible, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def is_torchrun() -> bool:
    """True when torchrun (or another launcher using its environment variables) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def local_world_size() -> int:
    """Ranks on this node (``pipeline.config.ranks_on_this_node``, out of the job's WORLD_SIZE)."""
    return ranks_on_this_node(int(os.environ.get("WORLD_SIZE", "1")))


def worker_device(backend: str) -> torch.device:
    """The device of this rank: its GPU with NCCL (see ``cuda_index``), the CPU with gloo."""
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        return torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of a rank: the one it sees where a launcher gives each rank its own (SLURM's ``--gpus-per-task``),
    else the one at its local rank."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise StopRun(
            f"local rank {local_rank} sees {visible} GPUs: start at most one rank per GPU of the node "
            "(trainer.devices, or torchrun --nproc-per-node)",
            EXIT_BAD_INPUT,
        )
    return local_rank


def free_port() -> int:
    """A TCP port that was free a moment ago on this host (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(
    worker: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 300.0,
    grace_s: float = 10.0,
) -> Any:
    """Run ``worker(rank, world_size, *args)`` on every rank; return rank 0's result (see the module docstring)."""
    backend = backend or default_backend()
    if is_torchrun():
        return _run_rank(worker, args, backend, timeout_s)
    port = free_port()
    if world_size == 1:
        with _rank_env(0, 1, port):
            return _run_rank(worker, args, backend, timeout_s)
    return _spawn(worker, world_size, args, backend, timeout_s, grace_s, port)


@contextmanager
def _rank_env(rank: int, world_size: int, port: int) -> Iterator[None]:
    """torchrun's environment variables for a local rank, removed again on exit (the next sweep job is fresh)."""
    env = dict(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run_rank(worker: Callable[..., Any], args: tuple, backend: str, timeout_s: float) -> Any:
    """Initialise the process group from the environment, run the worker, always tear the group down."""
    if backend == "gloo":
        # one compute-thread pool per rank, sized to this rank's share of the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_world_size()))
    else:
        torch.cuda.set_device(worker_device(backend))
    dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        return worker(dist.get_rank(), dist.get_world_size(), *args)
    finally:
        dist.destroy_process_group()


def _child(worker, rank, world_size, port, backend, timeout_s, results, args) -> None:
    """Entry point of a spawned rank: reports ("ok", rank, value) or ("stop", rank, message, code)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into SIGTERM for us
    # tqdm's default lock is a multiprocessing semaphore, which a rank killed by that SIGTERM (evaluation) leaves
    # for Python's resource tracker to warn about; only rank 0 draws bars, so a thread lock is enough
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_stop_when_orphaned, args=(mp.parent_process().pid,), daemon=True).start()
    try:
        with _rank_env(rank, world_size, port):
            value = _run_rank(worker, args, backend, timeout_s)
    except StopRun as stop:
        results.put(("stop", rank, str(stop), stop.exit_code))
        sys.exit(stop.exit_code)
    results.put(("ok", rank, value if rank == 0 else None))


def _stop_when_orphaned(parent: int, poll_s: float = 0.5) -> None:
    """A rank whose launcher was killed (SIGKILL, the OOM killer) would train on unwatched, holding its GPU: it
    sends itself the SIGTERM the launcher would have forwarded (the trainer saves a checkpoint and stops)."""
    while os.getppid() == parent:
        time.sleep(poll_s)
    os.kill(os.getpid(), signal.SIGTERM)


@contextmanager
def chained_signal_handlers(signals: tuple[signal.Signals, ...], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """Install ``handler`` for ``signals`` while inside; on leaving, restore the previous handlers and pass each
    signal received to the previous handler when it was a Python function (e.g. submitit's requeue on SIGUSR2),
    so an outer scheduler still sees it, but only once our own work (the checkpoint) is done."""
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:
        received.append(signum)
        handler(signum, frame)

    previous = {sig: signal.signal(sig, record) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        for signum in dict.fromkeys(received):
            outer = previous.get(signum)
            if callable(outer) and outer is not signal.default_int_handler:  # not a KeyboardInterrupt after all
                outer(signum, None)


@contextmanager
def _forwarding_signals(processes: list) -> Iterator[list[int]]:
    """While inside, ``FORWARDED_SIGNALS`` go on to the children and Ctrl-C becomes SIGTERM (twice: SIGKILL); yields the
    list of Ctrl-Cs received."""
    interrupts: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) == 1:
                print("\nCtrl-C: asking the workers to stop (Ctrl-C again: at once)", flush=True)
            signum = signal.SIGTERM if len(interrupts) == 1 else signal.SIGKILL
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    previous_interrupt = signal.signal(signal.SIGINT, forward)
    try:
        with chained_signal_handlers(FORWARDED_SIGNALS, forward):
            yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous_interrupt)


def _spawn(worker, world_size, args, backend, timeout_s, grace_s, port) -> Any:
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [
        context.Process(target=_child, args=(worker, rank, world_size, port, backend, timeout_s, results, args))
        for rank in range(world_size)
    ]
    try:
        with _forwarding_signals(processes) as interrupts:
            for process in processes:
                process.start()
            reports = _watch(processes, results, grace_s)
    finally:
        for process in processes:  # only reached alive on an exception in the parent itself
            if process.exitcode is None and process.pid is not None:
                process.kill()
                process.join()
    stops = sorted((r for r in reports if r[0] == "stop"), key=lambda r: r[1])
    if stops:
        _, rank, message, code = stops[0]
        if interrupts and code == 128 + signal.SIGTERM:  # the SIGTERM was our forwarding of a Ctrl-C: say so
            message, code = message.replace("SIGTERM", "SIGINT (Ctrl-C)", 1), 128 + signal.SIGINT
        raise StopRun(message, code)
    if interrupts:  # workers killed by it (evaluation), or done before acting on it: no next job of a sweep
        raise KeyboardInterrupt
    failed = [f"rank {rank} {_exit_reason(p.exitcode)}" for rank, p in enumerate(processes) if p.exitcode != 0]
    if failed:
        raise StopRun(f"worker {', '.join(failed)}; the others were stopped (its traceback, if any, is above)", 1)
    return next(r[2] for r in reports if r[0] == "ok" and r[1] == 0)


def _exit_reason(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"


def _watch(processes: list, results, grace_s: float, poll_s: float = 0.2) -> list[tuple]:
    """Wait for every child, collecting their reports; once one has failed, kill those still running
    ``grace_s`` seconds later. Reports are read while the children run: a result larger than the pipe's
    buffer (64 KiB) blocks its sender until it is read."""
    reports: list[tuple] = []

    def drain() -> None:
        while not results.empty():
            reports.append(results.get())

    failed_at = None
    while any(p.exitcode is None for p in processes):
        drain()
        time.sleep(poll_s)
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace_s:
            for process in processes:
                if process.exitcode is None:
                    process.kill()
    for process in processes:
        process.join()
    drain()
    return reports
