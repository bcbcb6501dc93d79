"""Validation error of trained models, centre crop and ten-crop, one model or an ensemble (paper, section 6).

    python -m train.evaluate checkpoint=PATH[,PATH...] data.root=PATH [devices=N] [out=FILE.json] [tencrop=false]

Several checkpoints are an ensemble: their softmax outputs are averaged, as the paper's 5 and 7 CNNs. Each
model's data config (crop size, mean, std) comes from its checkpoint; only ``data.root`` (and the optional
``data.threads`` / ``data.loader``) come from the command line. With ``devices=N`` the validation split is
shared by N worker processes (GPUs, or gloo CPU processes) through ``train.distributed.launch``; each rank
reads a disjoint part, and correct counts, not rates, are summed with one all-reduce, so every sample counts
exactly once. One ten-crop pass gives both numbers: its first patch is the centre crop
(``pipeline.lighting.tencrop_offsets``: five patches, then the same five mirrored).

The mirrored half of the ten patches is used only for models trained with mirroring (``data.flip``), unless
``mirror=true|false`` says otherwise: a model that never saw mirrored digits (the demo) gets its error raised, not
lowered, by averaging in predictions on mirror images. Without them "ten-crop" is the five patches.

Exit status: 0 done; 2 bad input (one line: missing checkpoint or data, a model that does not fit the data, an
option of the wrong type or range, an ``out`` that cannot be written), found before any worker starts where it can be.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from tqdm import tqdm

from pipeline.config import DataSpec
from pipeline.loader import build_loader
from preprocess.cli import run_cli
from preprocess.config_values import ConfigValueError, as_bool, as_float, as_int
from preprocess.shard_format import read_meta, write_json_atomic
from train.checkpoint import CheckpointError, load_checkpoint
from train.config import ConfigError
from train.distributed import StopRun, default_backend, launch, worker_device
from train.loop import EXIT_BAD_INPUT, USER_ERRORS, build_model
from train.main import resolve
from train.metrics import count_correct, errors_from_counts, multi_crop_name, patches_used, tencrop_probs

# per model and for the ensemble: correct counts in this order, then the number of samples
COUNT_NAMES = ("top1", "top5", "tencrop_top1", "tencrop_top5")
DATA_OVERRIDES = ("root", "threads", "loader")


def split_paths(checkpoint: str | Sequence[str]) -> list[str]:
    """``a.pt,b.pt`` (or a list) -> ``["a.pt", "b.pt"]``. A comma inside a path is kept where the pieces around it
    name an existing file or folder together: train.main's run folders with several overrides have commas."""
    paths = []
    for item in [checkpoint] if isinstance(checkpoint, str) else list(checkpoint):
        pieces = str(item).split(",")
        while pieces:
            joined = [Path(",".join(pieces[:n]).strip()) for n in range(1, len(pieces) + 1)]
            files = [n for n, path in enumerate(joined, 1) if path.is_file()]
            folders = [n for n, path in enumerate(joined, 1) if path.is_dir()]
            end = files[0] if files else folders[-1] if folders else 1  # a folder: the longest, to name its file
            path, pieces = ",".join(pieces[:end]).strip(), pieces[end:]
            if path:
                paths.append(path)
    if not paths:
        raise ConfigError("checkpoint is empty: pass checkpoint=PATH[,PATH...] (files written by train.main)")
    return paths


def eval_data_config(train_data: dict[str, Any], overrides: dict[str, Any], batch_size: int) -> dict[str, Any]:
    """The checkpoint's data config with the command line's root (threads, loader) and the evaluation batch."""
    data = {**train_data, "batch_size": batch_size}
    data.update({key: value for key, value in overrides.items() if key in DATA_OVERRIDES and value is not None})
    return data


def errors_from_count_vector(counts: Sequence[int]) -> dict[str, float]:
    """``[top1, top5, tencrop_top1, tencrop_top5, total]`` correct counts -> the four error rates."""
    *correct, total = (int(c) for c in counts)
    errors = errors_from_counts(correct, total)
    return {f"{name}_err": err for name, err in zip(COUNT_NAMES, errors, strict=True)}


def ensemble_counts(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Correct counts of one batch for every model and for their average: (models + 1, 4) int64.

    ``logits`` holds one (B, crops, C) tensor per model, crop 0 the centre crop (models may use different
    numbers of crops). Rows: the models in order, then the ensemble: softmax averaged over models (centre),
    and over each model's crops, then over models (multi-crop).
    """
    centre = [tencrop_probs(model[:, :1]) for model in logits]
    crops = [tencrop_probs(model) for model in logits]
    rows = [torch.cat([count_correct(c, labels), count_correct(m, labels)]) for c, m in zip(centre, crops, strict=True)]
    ensemble = [torch.stack(probs).mean(dim=0) for probs in (centre, crops)]
    rows.append(torch.cat([count_correct(probs, labels) for probs in ensemble]))
    return torch.stack(rows)


def evaluate_worker(
    rank: int,
    world_size: int,
    paths: list[str],
    data_overrides: dict[str, Any],
    batch_size: int,
    tencrop: bool,
    mirror: str | bool,
) -> dict[str, Any]:
    """Count correct predictions over this rank's part of the val split; rank 0 returns the all-rank totals."""
    try:
        return _evaluate(rank, world_size, paths, data_overrides, batch_size, tencrop, mirror)
    except USER_ERRORS as err:
        raise StopRun(str(err), EXIT_BAD_INPUT) from None


def trained_model(
    path: str | Path, checkpoint: dict[str, Any], data: dict[str, Any], num_classes: int
) -> torch.nn.Module:
    """The checkpoint's network with its weights, in eval mode, for the data config ``data``."""
    model = build_model({**checkpoint["config"], "data": data}, num_classes)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1].strip()
        raise CheckpointError(
            f"checkpoint {path} does not fit the data in {data['root']} ({reason}): "
            "evaluate on the dataset it was trained on"
        ) from None
    return model.eval()


def _evaluate(rank, world_size, paths, data_overrides, batch_size, tencrop, mirror) -> dict[str, Any]:
    device = worker_device(dist.get_backend())
    models, loaders, data_keys, patches = [], {}, [], []
    for path in paths:
        checkpoint = load_checkpoint(path)
        config = checkpoint["config"]
        data = eval_data_config(config["data"], data_overrides, batch_size)
        key = json.dumps(data, sort_keys=True)  # models with the same preprocessing share one loader
        if key not in loaders:
            mode = "tencrop" if tencrop else "center"
            loaders[key] = build_loader(data, "val", mode, rank=rank, world_size=world_size, device=device)
        model = trained_model(path, checkpoint, data, loaders[key].num_classes)
        models.append(model.to(device))
        data_keys.append(key)
        patches.append(patches_used(config["data"], mirror) if tencrop else 1)

    keys = list(loaders)
    counts = torch.zeros(len(models) + 1, len(COUNT_NAMES) + 1, dtype=torch.int64, device=device)
    bar = tqdm(
        total=loaders[keys[0]].num_samples * world_size,
        desc="evaluate",
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        disable=rank != 0,
    )
    with torch.no_grad(), bar:
        for batches in zip(*(loaders[key] for key in keys), strict=True):
            images = dict(zip(keys, (batch[0] for batch in batches), strict=True))
            labels = batches[0][1]
            if any(not torch.equal(batch[1], labels) for batch in batches[1:]):
                raise ConfigError("the models' loaders read the val split in different orders: evaluate them apart")
            logits = []
            for model, key, used in zip(models, data_keys, patches, strict=True):
                x = images[key][:, :used] if tencrop else images[key].unsqueeze(1)  # (B, crops, 3, H, W)
                logits.append(model(x.flatten(0, 1).float()).view(*x.shape[:2], -1).float())
            counts[:, :-1] += ensemble_counts(logits, labels)
            counts[:, -1] += labels.shape[0]
            bar.update(labels.shape[0] * world_size)
    dist.all_reduce(counts)
    return {"counts": counts.cpu().tolist(), "patches": patches}


def report(paths: list[str], counts: list[list[int]], patches: list[int], seconds: float) -> dict[str, Any]:
    """The JSON result: the ensemble's (or the single model's) errors, count, and per-model errors and patches."""
    tencrop = max(patches) > 1
    rows = [errors_from_count_vector(row) for row in counts]
    if not tencrop:
        for row in rows:
            row["tencrop_top1_err"] = row["tencrop_top5_err"] = None
    result = {**rows[-1], "count": counts[-1][-1], "models": len(paths), "seconds": round(seconds, 2)}
    result["per_model"] = [
        {"checkpoint": path, **row, "patches": used} for path, row, used in zip(paths, rows, patches, strict=False)
    ]
    return result


def format_table(result: dict[str, Any]) -> str:
    """A small text table: one line per model, and the ensemble when there are several."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    lines = [f"{'model [patches]':<44} {'top-1':>8} {'top-5':>8} {'crops top-1':>11} {'crops top-5':>11}"]
    rows = [(f"{row['checkpoint']} [{row['patches']}]", row) for row in result["per_model"]]
    if result["models"] > 1:
        rows.append((f"ensemble of {result['models']}", result))
    for name, row in rows:
        name = name if len(name) <= 44 else "..." + name[-41:]
        top1, top5, tencrop1, tencrop5 = (cell(row[f"{kind}_err"]) for kind in COUNT_NAMES)
        lines.append(f"{name:<44} {top1:>8} {top5:>8} {tencrop1:>11} {tencrop5:>11}")
    return "\n".join(lines)


def mirror_option(value: Any) -> str | bool:
    """``mirror``: ``auto``, or true / false as ``preprocess.config_values.as_bool`` reads them."""
    if value == "auto":
        return "auto"
    try:
        return as_bool("mirror", value)
    except ConfigValueError:
        raise ConfigError(f"mirror={value!r} is unknown: use auto, true or false") from None


@dataclass(frozen=True)
class EvalOptions:
    """The command's own options (conf/evaluate.yaml), converted and checked before any worker starts."""

    devices: int
    batch_size: int
    tencrop: bool
    mirror: str | bool
    timeout_s: float

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> EvalOptions:
        options = cls(
            devices=as_int("devices", cfg["devices"], low=1),
            batch_size=as_int("batch_size", cfg["batch_size"], low=1),
            tencrop=as_bool("tencrop", cfg["tencrop"]),
            mirror=mirror_option(cfg["mirror"]),
            timeout_s=as_float("timeout_s", cfg["timeout_s"], low=0, low_open=True),
        )
        if options.batch_size % options.devices:
            raise ConfigError(
                f"batch_size={options.batch_size} must be a positive multiple of devices={options.devices}"
            )
        return options


def warn_of_another_scale(path: str, trained: int | None, evaluated: int) -> None:
    """A model trained on shards of one image size sees objects at another scale in shards of another size: legal
    (a scale study), but usually the wrong data.root, so say so on stderr."""
    if trained is not None and int(trained) != int(evaluated):
        print(
            f"warning: {path} was trained on {trained}px shards, data.root holds {evaluated}px ones: "
            "objects appear at another scale",
            file=sys.stderr,
            flush=True,
        )


def writable_out(out: Any) -> Path | None:
    """``out`` (None when not given) once its folder exists and takes a new file: checked before evaluating."""
    if out is None or str(out) == "":
        return None
    path = Path(str(out))
    if path.is_dir():
        raise ConfigError(f"out={out} is a folder: give the result file's name, e.g. out={path / 'eval.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as err:
        path_is_file = isinstance(err, (FileExistsError, NotADirectoryError))
        reason = "part of its folder path is a file" if path_is_file else err.strerror or str(err)
        raise ConfigError(f"out={out} cannot be written ({reason}): choose another out=") from None
    return path


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check the inputs in this process, evaluate on ``devices`` ranks, print and write the result."""
    options = EvalOptions.from_cfg(cfg)
    paths = split_paths(cfg["checkpoint"])
    for path in paths:  # fail here, before any worker starts, on a missing or damaged file or a bad data value
        checkpoint = load_checkpoint(path)
        spec = DataSpec.from_cfg(eval_data_config(checkpoint["config"]["data"], dict(cfg["data"]), options.batch_size))
        warn_of_another_scale(path, checkpoint.get("image_size"), read_meta(spec.root)["settings"]["image_size"])
    out_path = writable_out(cfg.get("out"))
    backend = default_backend()
    if backend == "nccl" and options.devices > torch.cuda.device_count():
        raise ConfigError(f"devices={options.devices} but only {torch.cuda.device_count()} GPUs are visible: lower it")
    started = time.perf_counter()
    out = launch(
        evaluate_worker,
        options.devices,
        paths,
        dict(cfg["data"]),
        options.batch_size,
        options.tencrop,
        options.mirror,
        backend=backend,
        timeout_s=options.timeout_s,
    )
    result = report(paths, out["counts"], out["patches"], time.perf_counter() - started)
    print(format_table(result))
    summary = f"top-1 error {result['top1_err']:.2%} centre crop"
    if result["tencrop_top1_err"] is not None:
        summary += f", {result['tencrop_top1_err']:.2%} {multi_crop_name(out['patches'])}"
    summary += f" on {result['count']} val images in {result['seconds']:.1f} s"
    if out_path is not None:
        write_json_atomic(out_path, result)
        summary += f"; {out_path}"
    print(summary, flush=True)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        run(resolve(cfg))
        return
    except USER_ERRORS as err:
        stop = StopRun(str(err), EXIT_BAD_INPUT)
    except StopRun as err:
        stop = err
    print(("error: " if stop.exit_code == EXIT_BAD_INPUT else "") + str(stop), file=sys.stderr, flush=True)
    sys.exit(stop.exit_code)


if __name__ == "__main__":
    run_cli(main, path_keys=("checkpoint", "data.root", "out"))
