"""Dynamic temperature (llama.cpp dynatemp) and EDT against hand-computed temperatures."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive.sampling import dynatemp

NEG_INF = float("-inf")
# p = [0.5, 0.25, 0.25]: H = 1.5 ln 2 = 1.0397, H / ln 3 = 0.946395
RAW = torch.log(torch.tensor([0.5, 0.25, 0.25]))
NORMALIZED_ENTROPY = 1.5 * math.log(2) / math.log(3)


def dyn(scaled: torch.Tensor, t0: float, delta: float, exponent: float = 1.0) -> torch.Tensor:
    x = scaled.unsqueeze(0).clone()
    dynatemp.apply_dynatemp_(x, torch.tensor([t0]), torch.tensor([delta]), torch.tensor([exponent]))
    return x[0]


def test_uniform_row_gets_the_top_of_the_range() -> None:
    out = dyn(torch.full((10,), 2.0), t0=1.0, delta=0.5)
    assert out.tolist() == pytest.approx([2.0 / 1.5] * 10)


@pytest.mark.parametrize(("exponent", "temperature"), [(1.0, 1.446395), (2.0, 1.395663)])
def test_temperature_from_normalized_entropy(exponent: float, temperature: float) -> None:
    assert 0.5 + NORMALIZED_ENTROPY**exponent == pytest.approx(temperature, abs=1e-6)
    out = dyn(RAW, t0=1.0, delta=0.5, exponent=exponent)
    assert out.tolist() == pytest.approx((RAW / temperature).tolist(), rel=1e-5)
    _, t = dynatemp.dynatemp_reference(RAW, 1.0, 0.5, exponent)
    assert t == pytest.approx(temperature, abs=1e-6)


def test_entropy_is_measured_before_the_request_temperature() -> None:
    # vLLM hands over RAW / T0; the temperature comes from RAW's entropy: 1.5 + 0.946 = 2.446.
    out = dyn(RAW / 2.0, t0=2.0, delta=0.5)
    assert out.tolist() == pytest.approx((RAW / 2.446395).tolist(), rel=1e-5)


def test_low_end_of_the_range_is_clamped_at_zero() -> None:
    # T0 = 0.3, delta = 0.5: range [0, 0.8], T = 0.8 * 0.946 = 0.757
    out = dyn(RAW / 0.3, t0=0.3, delta=0.5)
    assert out.tolist() == pytest.approx((RAW / (0.8 * NORMALIZED_ENTROPY)).tolist(), rel=1e-5)


def test_temperature_near_zero_keeps_only_the_top_token() -> None:
    out = dyn(torch.tensor([0.0, -50.0, -50.0]), t0=0.3, delta=0.5, exponent=10.0)
    assert out.tolist() == [0.0, NEG_INF, NEG_INF]


def test_neg_inf_entries_are_not_candidates() -> None:
    # two finite equal logits: H = ln 2 = ln N, so T = T0 + delta
    out = dyn(torch.tensor([1.0, NEG_INF, 1.0]), t0=1.0, delta=0.5)
    assert out.tolist() == pytest.approx([1 / 1.5, NEG_INF, 1 / 1.5])


def test_edt_temperature() -> None:
    # T = T0 * 0.8^(theta / H), H = ln 2: 0.8^(1 / ln 2) = 0.72475
    x = torch.tensor([[1.0, 1.0, NEG_INF]])
    dynatemp.apply_edt_(x, torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([1.0]))
    assert x[0].tolist() == pytest.approx([1 / 0.7247503, 1 / 0.7247503, NEG_INF], rel=1e-5)


def test_edt_zero_entropy_is_greedy() -> None:
    x = torch.tensor([[0.0, -200.0, -200.0]])  # H ~ 1e-84 is 0 in float32
    dynatemp.apply_edt_(x, torch.tensor([1.0]), torch.tensor([0.8]), torch.tensor([1.0]))
    assert x.tolist() == [[0.0, NEG_INF, NEG_INF]]


def test_params() -> None:
    assert [(p.key, p.interval()) for p in dynatemp.PARAMS] == [
        ("dynatemp_range", "[0, 10]"), ("dynatemp_exponent", "(0, 10]")
    ]
    assert [(p.key, p.interval()) for p in dynatemp.EDT_PARAMS] == [
        ("edt_base", "(0, 1)"), ("edt_theta", "(0, 10]")
    ]
