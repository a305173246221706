"""Epsilon and eta sampling against hand-computed keep-sets (HF Epsilon/EtaLogitsWarper)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive.kernels.row_stats import row_stats
from vllm_adaptive.sampling import epsilon_eta

NEG_INF = float("-inf")
PROBS = [0.5, 0.3, 0.15, 0.05]
ENTROPY = 1.1421200429883351  # -sum p ln p of PROBS


def kept(probs: list[float], epsilon: float, eta_cutoff: float) -> list[bool]:
    x = torch.log(torch.tensor([probs]))
    epsilon_eta.apply_epsilon_eta_(x, torch.tensor([epsilon]), torch.tensor([eta_cutoff]))
    return (x[0] > NEG_INF).tolist()


@pytest.mark.parametrize(
    ("epsilon", "expected"),
    [
        (0.1, [True, True, True, False]),
        (0.31, [True, False, False, False]),
        (0.9, [True, False, False, False]),  # every token below: the top one stays
    ],
)
def test_epsilon_drops_tokens_below_it(epsilon: float, expected: list[bool]) -> None:
    assert kept(PROBS, epsilon, 0.0) == expected
    reference = epsilon_eta.keep_set_reference(torch.log(torch.tensor(PROBS)), epsilon, 0.0)
    assert reference.tolist() == expected


def test_eta_cutoff_shrinks_with_entropy() -> None:
    # eta = 0.35: cutoff min(0.35, sqrt(0.35) * exp(-H)) = 0.1888, so the 0.3 token stays
    # (epsilon = 0.35 would drop it) and the 0.15 token goes.
    assert math.sqrt(0.35) * math.exp(-ENTROPY) == pytest.approx(0.18880678)
    assert kept(PROBS, 0.0, 0.35) == [True, True, False, False]
    assert kept(PROBS, 0.35, 0.0) == [True, False, False, False]
    # eta = 0.1: sqrt(0.1) * exp(-H) = 0.1009 > 0.1, so the cutoff is eta itself.
    assert kept(PROBS, 0.0, 0.1) == [True, True, True, False]


def test_threshold_is_the_cutoff_in_logit_space() -> None:
    x = torch.log(torch.tensor([PROBS]))
    threshold = epsilon_eta.keep_threshold(row_stats(x), torch.tensor([0.0]), torch.tensor([0.35]))
    assert threshold.item() == pytest.approx(math.log(0.18880678), rel=1e-5)


def test_both_cutoffs_drop_what_either_drops() -> None:
    assert kept(PROBS, 0.1, 0.35) == [True, True, False, False]
    assert kept(PROBS, 0.31, 0.1) == [True, False, False, False]


def test_ties_with_the_top_token_survive_any_cutoff() -> None:
    assert kept([0.25] * 4, 0.5, 0.5) == [True] * 4


def test_neg_inf_entries_stay_out() -> None:
    x = torch.tensor([[0.0, NEG_INF, -1.0, NEG_INF]])
    epsilon_eta.apply_epsilon_eta_(x, torch.tensor([1e-3]), torch.tensor([0.0]))
    assert x.tolist() == [[0.0, NEG_INF, -1.0, NEG_INF]]


def test_params() -> None:
    assert [(p.key, p.interval()) for p in epsilon_eta.EPSILON_PARAMS] == [("epsilon", "(0, 1)")]
    assert [(p.key, p.interval()) for p in epsilon_eta.ETA_PARAMS] == [("eta_cutoff", "(0, 1)")]
