"""Budget rules and triggers for KV compaction (vllm_adaptive.kvcache.budget), against values
worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive.kvcache.budget import BudgetRule, effective_tokens


def test_effective_tokens_of_uniform_one_hot_and_empty_rows() -> None:
    mass = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 7.0, 0.0, 0.0], [0.0] * 5])
    assert effective_tokens(mass).tolist() == pytest.approx([4.0, 1.0, 1.0])
    # p = (0.5, 0.25, 0.25): H = 1.5 ln 2, exp(H) = 2^1.5
    assert float(effective_tokens(torch.tensor([[2.0, 1.0, 1.0]]))[0]) == pytest.approx(2 ** 1.5)


def test_fixed_and_ratio_budgets_are_clamped_to_min_tokens_and_length() -> None:
    fixed = BudgetRule(rule="fixed", tokens=100, min_tokens=40, sinks=4, recent=8)
    assert [fixed.budget(n) for n in (30, 80, 1000)] == [30, 80, 100]
    ratio = BudgetRule(rule="ratio", ratio=0.25, min_tokens=40, sinks=4, recent=8)
    assert [ratio.budget(n) for n in (30, 100, 1000, 1001)] == [30, 40, 250, 251]


def test_entropy_budget_follows_the_heads_mean_effective_tokens() -> None:
    rule = BudgetRule(rule="entropy", multiplier=2.0, min_tokens=12, sinks=2, recent=4)
    length = 1000
    focused = torch.zeros(2, length)
    focused[:, 10] = 1.0  # both heads on one token: 2 * 1 + 6 -> min_tokens
    assert rule.budget(length, focused) == 12
    spread = focused.clone()
    spread[1, 100:150] = 1.0  # head 1 spreads over 51 tokens: ceil(2 * (1 + 51) / 2) + 2 + 4
    assert rule.budget(length, spread) == 58
    short = torch.zeros(2, 60)
    short[:, 5:56] = 1.0  # both over 51 tokens: 108 > 60
    assert rule.budget(60, short) == 60  # never more than the length
    with pytest.raises(ValueError, match="attention mass"):
        rule.budget(length)


def test_triggers() -> None:
    rule = BudgetRule(buffer=16)
    assert rule.compact_after_prompt(length=100, budget=64)
    assert not rule.compact_after_prompt(length=64, budget=64)
    assert not rule.compact_during_decode(physical_length=79, budget=64)
    assert rule.compact_during_decode(physical_length=80, budget=64)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("rule", "h2o", "rule must be one of"),
    ("tokens", 0, "tokens must be"),
    ("ratio", 0.0, "ratio must be in"),
    ("ratio", 1.5, "ratio must be in"),
    ("multiplier", math.inf, "multiplier must be"),
    ("min_tokens", 10, "min_tokens must be at least sinks \\+ recent = 36"),
    ("buffer", 0, "buffer must be"),
])
def test_bad_rules_are_refused_naming_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BudgetRule(**{field: value})


def test_target_is_the_budget_before_the_cap_at_the_length() -> None:
    fixed = BudgetRule(rule="fixed", tokens=100, min_tokens=8, sinks=4, recent=4)
    assert [fixed.target(n) for n in (30, 1000)] == [100, 100]
    assert [fixed.budget(n) for n in (30, 1000)] == [30, 100]
    ratio = BudgetRule(rule="ratio", ratio=0.25, min_tokens=40, sinks=4, recent=4)
    assert [ratio.target(n) for n in (30, 1000)] == [40, 250]
