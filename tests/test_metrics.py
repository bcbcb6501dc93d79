"""Top-k counting and softmax averaging against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from train.metrics import count_correct, ensemble_probs, errors_from_counts, tencrop_probs, topk_errors


def numpy_topk_correct(scores: np.ndarray, labels: np.ndarray, k: int) -> int:
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return int(sum(label in row for row, label in zip(ranked, labels, strict=True)))


def numpy_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_count_correct_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(300, 20)), rng.integers(0, 20, size=300)
    counts = count_correct(torch.from_numpy(scores), torch.from_numpy(labels), ks=(1, 5))
    assert counts.dtype == torch.int64
    assert counts.tolist() == [numpy_topk_correct(scores, labels, 1), numpy_topk_correct(scores, labels, 5)]


def test_hand_made_batch() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.35, 0.25, 0.4]])
    labels = torch.tensor([1, 2, 0])
    assert count_correct(scores, labels, ks=(1, 2, 5)).tolist() == [1, 2, 3]  # k above C counts every row
    assert topk_errors(scores, labels, ks=(1, 2)) == pytest.approx([2 / 3, 1 / 3])


def test_logits_and_probabilities_count_the_same() -> None:
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(2))
    assert torch.equal(count_correct(logits, labels), count_correct(torch.softmax(logits, 1), labels))


def test_errors_from_counts() -> None:
    assert errors_from_counts(torch.tensor([30, 45]), 50) == pytest.approx([0.4, 0.1])
    assert all(np.isnan(errors_from_counts([0, 0], 0)))


def test_tencrop_average_is_the_mean_of_softmaxes() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3, size=(4, 10, 7))
    expected = numpy_softmax(logits).mean(axis=1)
    np.testing.assert_allclose(tencrop_probs(torch.from_numpy(logits)).numpy(), expected, rtol=1e-6)
    # averaging softmaxes is not the softmax of averaged logits
    assert not np.allclose(expected, numpy_softmax(logits.mean(axis=1)), rtol=1e-3)


def test_ensemble_average_of_models_and_of_their_crops() -> None:
    rng = np.random.default_rng(4)
    per_model = [rng.normal(size=(5, 6)) for _ in range(3)]
    expected = np.mean([numpy_softmax(x) for x in per_model], axis=0)
    got = ensemble_probs([torch.from_numpy(x) for x in per_model])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    crops = [rng.normal(size=(5, 10, 6)) for _ in range(2)]
    expected = np.mean([numpy_softmax(x).mean(axis=1) for x in crops], axis=0)
    np.testing.assert_allclose(ensemble_probs([torch.from_numpy(x) for x in crops]).numpy(), expected, rtol=1e-6)


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5,\)"):
        count_correct(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))


def test_patches_used_follows_training_flips_unless_forced() -> None:
    from train.metrics import patches_used

    assert patches_used({"flip": True}) == 10 and patches_used({}) == 10  # the paper's ten patches
    assert patches_used({"flip": False}) == 5  # never saw mirror images: only the five unmirrored patches
    assert patches_used({"flip": False}, mirror=True) == 10 and patches_used({"flip": True}, mirror=False) == 5
    assert patches_used({"flip": "false"}) == 5  # the text the trainer accepts, stored as given in the checkpoint
