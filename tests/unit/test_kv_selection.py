"""Token selection and scorers for KV compaction (vllm_adaptive.kvcache.selection), against
plain-Python references written here token by token."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vllm_adaptive.kvcache.selection import keynorm_scores, pool_scores, select_tokens


def reference_selection(scores: list[list[float]] | None, heads: int, length: int, budget: int,
                        sinks: int, recent: int) -> list[list[int]]:
    keep = min(budget, length)
    out = []
    for h in range(heads):
        if keep == length:
            out.append(list(range(length)))
            continue
        first = min(sinks, keep)
        last = min(recent, keep - first)
        middle = keep - first - last
        kept = set(range(first)) | set(range(length - last, length))
        between = list(range(first, length - last))
        if scores is None:
            kept |= set(between[len(between) - middle:] if middle else [])
        else:
            ranked = sorted(between, key=lambda t: (-scores[h][t], t))  # ties: earlier token
            kept |= set(ranked[:middle])
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_selection_matches_the_reference_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    heads, length = rng.choice([1, 2, 8]), rng.randint(1, 90)
    budget, sinks, recent = rng.randint(0, length + 3), rng.randint(0, 6), rng.randint(0, 20)
    scores = [[float(rng.randint(0, 4)) for _ in range(length)] for _ in range(heads)]  # many ties
    got = select_tokens(torch.tensor(scores), length, budget, sinks, recent)
    assert got.dtype == torch.int64
    assert got.tolist() == reference_selection(scores, heads, length, budget, sinks, recent)


def test_heads_choose_their_own_tokens_around_shared_sinks_and_recent() -> None:
    scores = torch.zeros(2, 12)
    scores[0, 5], scores[0, 6] = 3.0, 2.0
    scores[1, 3], scores[1, 7] = 1.0, 5.0
    got = select_tokens(scores, 12, budget=6, sinks=2, recent=2)
    assert got.tolist() == [[0, 1, 5, 6, 10, 11], [0, 1, 3, 7, 10, 11]]


def test_streaming_keeps_sinks_and_the_most_recent_tokens() -> None:
    got = select_tokens(None, 20, budget=7, sinks=3, recent=2, num_heads=2)
    assert got.tolist() == [[0, 1, 2, 16, 17, 18, 19]] * 2


def test_budget_at_or_above_the_length_keeps_everything() -> None:
    scores = torch.rand(3, 10)
    assert select_tokens(scores, 10, budget=10).tolist() == [list(range(10))] * 3
    assert select_tokens(scores, 10, budget=50).tolist() == [list(range(10))] * 3


def test_budget_smaller_than_sinks_keeps_only_sinks() -> None:
    assert select_tokens(torch.rand(1, 10), 10, budget=2, sinks=4, recent=3).tolist() == [[0, 1]]


@pytest.mark.parametrize("bad", [
    dict(scores=torch.rand(2, 5), length=6, budget=3),
    dict(scores=torch.tensor([[0.0, math.nan]]), length=2, budget=1),
    dict(scores=None, length=5, budget=3),
    dict(scores=torch.rand(1, 5), length=5, budget=-1),
])
def test_bad_arguments_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="select_tokens"):
        select_tokens(**bad)


def reference_pool(row: list[float], kernel: int, pooling: str) -> list[float]:
    half = kernel // 2
    out = []
    for i in range(len(row)):
        window = row[max(0, i - half) : i + half + 1]
        out.append(max(window) if pooling == "max" else sum(window) / len(window))
    return out


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_pooling_matches_the_reference(pooling: str, kernel: int) -> None:
    rng = random.Random(kernel)
    rows = [[rng.random() for _ in range(11)] for _ in range(3)]
    got = pool_scores(torch.tensor(rows, dtype=torch.float64), kernel, pooling)
    for h, row in enumerate(rows):
        assert got[h].tolist() == pytest.approx(reference_pool(row, kernel, pooling), rel=1e-6)


def test_pooling_refuses_even_kernels_and_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="odd"):
        pool_scores(torch.rand(1, 5), 4)
    with pytest.raises(ValueError, match="pooling"):
        pool_scores(torch.rand(1, 5), 3, "median")


def test_keynorm_prefers_small_keys() -> None:
    keys = torch.tensor([[[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]]])
    assert keynorm_scores(keys)[0].tolist() == pytest.approx([-5.0, -1.0, -math.sqrt(2.0)])
    assert select_tokens(keynorm_scores(keys), 3, budget=1, sinks=0, recent=0).tolist() == [[1]]
