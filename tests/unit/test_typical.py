"""Locally typical sampling against hand-computed keep-sets (HF TypicalLogitsWarper semantics)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive.sampling import typical

NEG_INF = float("-inf")
# H = 1.4708 nats; |-ln p - H| = [0.5545, 0.1386, 0.1386, 0.8318, 0.8318]:
# typicality order: the two 0.2 tokens (tied), then 0.4, then the two 0.1 tokens (tied).
PROBS = [0.4, 0.2, 0.2, 0.1, 0.1]


def kept(logits: list[float], typical_p: float) -> list[bool]:
    x = torch.tensor([logits])
    typical.apply_typical_(x, torch.tensor([typical_p]))
    assert x.isfinite().any()
    return (x[0] > NEG_INF).tolist()


def log(probs: list[float]) -> list[float]:
    return [math.log(p) if p > 0 else NEG_INF for p in probs]


@pytest.mark.parametrize(
    ("typical_p", "expected"),
    [
        (0.3, [True, True, True, False, False]),  # 0.2 + 0.2 = 0.4 >= 0.3
        (0.7, [True, True, True, False, False]),  # + 0.4 = 0.8 >= 0.7
        (0.85, [True, True, True, True, True]),  # needs one 0.1 token; its tie comes along
    ],
)
def test_keeps_the_most_typical_tokens_until_the_mass_is_reached(
    typical_p: float, expected: list[bool]
) -> None:
    assert kept(log(PROBS), typical_p) == expected
    assert typical.keep_set_reference(torch.tensor(log(PROBS)), typical_p).tolist() == expected


def test_tokens_tied_in_score_are_kept_together() -> None:
    # 1e-9 is reached by the first 0.2 token; the other 0.2 token has the same score.
    assert kept(log(PROBS), 1e-9)[1:3] == [True, True]


def test_top_token_is_kept_even_when_it_is_not_typical() -> None:
    # HF keeps [F, T, T, F, F] here; this project's samplers never drop the argmax.
    probs = [0.4, 0.2, 0.2, 0.1, 0.1]
    assert kept(log(probs), 0.3)[0] is True
    # H = 3.585: the tail (-ln 0.01 = 4.605) is typical, the top (-ln 0.3 = 1.204) is not.
    flat_tail = [0.3] + [0.01] * 70
    assert kept(log(flat_tail), 0.3) == [True] * 71
    assert typical.keep_set_reference(torch.tensor(log(flat_tail)), 0.3).all()


def test_neg_inf_entries_take_no_part() -> None:
    with_masked = log(PROBS) + [NEG_INF, NEG_INF]
    assert kept(with_masked, 0.3) == [True, True, True, False, False, False, False]


def test_typical_p_one_is_off() -> None:
    x = torch.tensor([log(PROBS)])
    before = x.clone()
    typical.apply_typical_(x, torch.tensor([1.0]))
    assert torch.equal(x, before)


def test_kept_mass_reaches_typical_p_on_random_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 5000, generator=g) * 2
    p = torch.linspace(0.05, 0.99, 16)
    out = x.clone()
    typical.apply_typical_(out, p)
    mass = torch.where(out > NEG_INF, torch.softmax(x.double(), dim=-1), 0.0).sum(dim=-1)
    assert (mass >= p.double() - 1e-6).all()


def test_params_declare_the_hf_range() -> None:
    (param,) = typical.PARAMS
    assert (param.key, param.interval()) == ("typical_p", "(0, 1]")
    assert typical.TYPICAL_P_DEFAULT == 0.95
