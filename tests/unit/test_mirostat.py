"""Mirostat v2 against its definition and llama.cpp's sort-based loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_adaptive.sampling import mirostat


def surprise_bits(logits: torch.Tensor) -> torch.Tensor:
    return -torch.log_softmax(logits.double(), dim=-1) / math.log(2)


def test_keeps_exactly_tokens_with_surprise_at_most_mu() -> None:
    # p = [0.5, 0.25, 0.125, 0.125] -> surprise = [1, 2, 3, 3] bits
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    for mu, expected in [(0.5, [True, False, False, False]), (2.0, [True, True, False, False]),
                         (2.5, [True, True, False, False]), (3.0, [True, True, True, True])]:
        masked = logits.clone()
        mirostat.apply_keep_set_(masked, torch.tensor([mu]))
        assert (masked[0] > float("-inf")).tolist() == expected, mu


def test_top_token_is_kept_even_when_mu_is_below_its_surprise() -> None:
    logits = torch.zeros(1, 8)  # uniform: every token has surprise 3 bits
    mirostat.apply_keep_set_(logits, torch.tensor([0.1]))
    assert (logits > float("-inf")).sum().item() == 8  # ties with the top token all stay


def test_kept_lse_renormalises_the_kept_set() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    lse = mirostat.apply_keep_set_(logits, torch.tensor([2.0]))
    # kept mass 0.75: the top token's renormalised probability is 2/3
    surprise = mirostat.observed_surprise(logits[0, 0], lse[0])
    assert surprise.item() == pytest.approx(-math.log2(2 / 3), rel=1e-5)


def test_update_moves_mu_towards_target() -> None:
    assert mirostat.update_mu(10.0, surprise_bits=6.0, tau=5.0, eta=0.1) == pytest.approx(9.9)
    assert mirostat.update_mu(10.0, surprise_bits=1.0, tau=5.0, eta=0.5) == pytest.approx(12.0)
    assert mirostat.initial_mu(3.0) == 6.0


def test_neg_inf_entries_stay_out_and_single_finite_logit_survives() -> None:
    logits = torch.full((1, 5), float("-inf"))
    logits[0, 3] = -7.0
    lse = mirostat.apply_keep_set_(logits, torch.tensor([0.01]))
    assert logits[0, 3].item() == -7.0
    assert torch.isinf(logits[0, [0, 1, 2, 4]]).all()
    assert lse[0].item() == pytest.approx(-7.0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    vocab=st.integers(1, 300),
    scale=st.floats(0.1, 20.0),
    mu=st.floats(0.01, 30.0),
)
def test_threshold_form_matches_llama_cpp_loop(seed: int, vocab: int, scale: float, mu: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, vocab, generator=gen) * scale
    masked = logits.clone()
    mirostat.apply_keep_set_(masked, torch.tensor([mu]))
    kept = masked[0] > float("-inf")
    assert kept.any()
    assert not torch.isnan(masked).any()
    assert torch.equal(masked[0][kept], logits[0][kept])  # kept logits are untouched
    reference = mirostat.keep_set_reference(logits[0], mu)
    # float32 threshold vs float64 loop may disagree only on tokens at the boundary
    near = (surprise_bits(logits[0]) - mu).abs() < 1e-4
    assert torch.equal(kept[~near], reference[~near])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), vocab=st.integers(2, 100))
def test_rows_are_independent(seed: int, rows: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 4
    mu = torch.rand(rows, generator=gen) * 8
    batched = logits.clone()
    mirostat.apply_keep_set_(batched, mu)
    for r in range(rows):
        single = logits[r : r + 1].clone()
        mirostat.apply_keep_set_(single, mu[r : r + 1])
        assert torch.equal(batched[r], single[0])

