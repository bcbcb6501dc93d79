"""Top-k error counting and softmax averaging (ten crops, ensembles): pure functions on tensors.

Counts, not rates, are what ranks exchange: summed with one all_reduce they give the exact error over
every validation sample, whatever the per-rank batch sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from preprocess.config_values import as_bool

TOPK = (1, 5)


def count_correct(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = TOPK) -> torch.Tensor:
    """How many rows have their label among the ``k`` highest scores, for each k: int64 tensor (len(ks),).

    ``scores`` (N, C) are logits or probabilities (the ranking is the same). A k above C counts every row.
    """
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(
            f"count_correct needs scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels.to(top.device).unsqueeze(1)
    return torch.stack([hits[:, :k].sum() for k in ks]).to(torch.int64)


def errors_from_counts(correct: torch.Tensor | Sequence[int], total: int) -> list[float]:
    """Error rates ``1 - correct / total`` (a rate of 0 samples is NaN, never a silent 0)."""
    return [1.0 - int(c) / total if total else float("nan") for c in correct]


def topk_errors(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = TOPK) -> list[float]:
    """Top-k error rates of one batch, e.g. ``[top1_err, top5_err]``."""
    return errors_from_counts(count_correct(scores, labels, ks), labels.shape[0])


def average_softmax(logits: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Mean of the softmax probabilities over ``dim`` (the class axis is the last): the paper's way to combine
    crops and models."""
    return torch.softmax(logits.float(), dim=-1).mean(dim=dim)


def patches_used(train_data: Mapping[str, Any], mirror: str | bool = "auto") -> int:
    """How many of the ten test patches to average: all 10 (the paper) for a model trained with mirroring, else
    the 5 unmirrored ones (a model that never saw mirror images, e.g. of digits, is hurt by them); ``mirror``
    (true/false) forces the choice. ``pipeline`` orders the patches five unmirrored, then the same five mirrored."""
    use = as_bool("data.flip", train_data.get("flip", True)) if mirror == "auto" else as_bool("mirror", mirror)
    return 10 if use else 5


def multi_crop_name(patches: list[int]) -> str:
    """What the summary line calls the multi-patch test of models averaging ``patches`` patches each."""
    kinds = {10: "ten-crop", 5: "five-crop (no mirrored patches)"}
    if len(set(patches)) == 1 and patches[0] in kinds:
        return kinds[patches[0]]
    return "multi-crop (" + "/".join(str(n) for n in patches) + " patches per model)"


def tencrop_probs(logits: torch.Tensor) -> torch.Tensor:
    """(B, crops, C) logits of the crops of each image -> (B, C) averaged softmax probabilities."""
    if logits.ndim != 3:
        raise ValueError(f"tencrop_probs needs logits (B, crops, C), got {tuple(logits.shape)}")
    return average_softmax(logits, dim=1)


def ensemble_probs(logits_per_model: Sequence[torch.Tensor]) -> torch.Tensor:
    """Softmax outputs of several models on the same images averaged: (B, C) or (B, crops, C) each -> (B, C)."""
    stacked = torch.stack(list(logits_per_model))
    return average_softmax(stacked, dim=(0, 2) if stacked.ndim == 4 else 0)
