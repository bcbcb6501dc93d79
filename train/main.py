"""Train AlexNet: ``python -m train.main [+experiment=NAME] [key=value ...]``; ``-m`` runs a sweep.

The parent (this process) composes and resolves the whole config (Hydra's interpolations do not resolve in
spawned children), checks it, then starts ``trainer.devices`` workers (or uses torchrun's) through
``train.distributed.launch``; rank 0's final validation top-1 error is returned for Hydra sweepers.

Run dirs are deterministic, so re-running a command finds its own ``checkpoints/last.pt`` and resumes
(``trainer.resume=auto``): ``outputs/<name>/<overrides>`` for a run, ``multirun/<name>/<overrides>`` for each
sweep job, where ``<overrides>`` is Hydra's ``override_dirname`` without keys that do not change the result
(data.root, trainer.resume, ...; see conf/config.yaml), or ``default`` when none is left.

Exit status: 0 done; 2 bad input (one line on stderr: missing data, bad stats, unknown key, bad checkpoint);
1 training diverged (NaN/inf loss; the last good checkpoint is kept) or a worker crashed;
128 + signal number after SIGTERM/SIGUSR2/SIGUSR1/Ctrl-C, once the checkpoint is saved (re-run to resume;
under submitit, its own handler then requeues the job).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from preprocess.cli import one_line, run_cli
from train.config import TrainerConfig, check_config, check_devices
from train.distributed import StopRun, is_torchrun, launch
from train.loop import CHECKPOINT_DIR, EXIT_BAD_INPUT, USER_ERRORS, train_worker
from train.runlog import METRICS_FILE

OmegaConf.register_new_resolver("or_default", lambda value: value or "default", replace=True)


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The composed config as a plain dict with every interpolation resolved; ``???`` left is an error."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as err:
        raise StopRun(
            f"{err.full_key} is not set: pass {err.full_key}=VALUE on the command line", EXIT_BAD_INPUT
        ) from None
    except OmegaConfBaseException as err:
        raise StopRun(f"config: {one_line(err)}", EXIT_BAD_INPUT) from None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        config = resolve(cfg)
        trainer = TrainerConfig.from_mapping(config["trainer"])
        if not is_torchrun():
            check_devices(trainer)
            check_config(config, trainer.devices)
        return launch(
            train_worker, trainer.devices, config, run_dir, backend=trainer.backend, timeout_s=trainer.timeout_s
        )
    except USER_ERRORS as err:
        stop = StopRun(str(err), EXIT_BAD_INPUT)
    except StopRun as err:
        stop = err
    if int(os.environ.get("RANK", "0")) == 0:
        if stop.exit_code == EXIT_BAD_INPUT and not is_torchrun():  # other torchrun ranks may be writing there
            remove_unused_run_dir(Path(run_dir))
        print(("error: " if stop.exit_code == EXIT_BAD_INPUT else "") + str(stop), file=sys.stderr, flush=True)
    sys.exit(stop.exit_code)


HYDRA_ROOTS = ("outputs", "multirun")  # conf/config.yaml's hydra.run.dir and hydra.sweep.dir


def remove_unused_run_dir(run_dir: Path) -> None:
    """Remove what Hydra made for a command that was refused: .hydra/ and an empty main.log, and, where the run
    folder is Hydra's default ``outputs/<name>/<overrides>`` or ``multirun/<name>/<overrides>`` in the cwd (made
    by Hydra for this command), that folder and its parents once empty. So typos leave no trail of run folders;
    a folder named with hydra.run.dir, or holding a run's checkpoints, metrics or anything else, stays."""
    if (run_dir / CHECKPOINT_DIR).exists() or (run_dir / METRICS_FILE).exists():
        return
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run_dir / ".hydra" / name).unlink(missing_ok=True)
    log = run_dir / "main.log"
    if log.is_file() and log.stat().st_size == 0:
        log.unlink()
    folders = [run_dir / ".hydra"]
    hydra_root = run_dir.resolve().parent.parent
    if hydra_root.parent == Path.cwd().resolve() and hydra_root.name in HYDRA_ROOTS:
        folders += [run_dir, run_dir.parent, hydra_root]
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else lives there
            return


if __name__ == "__main__":
    run_cli(main, path_keys=("trainer.resume", "hydra.run.dir"), appends=True)
