"""Mirostat v1 against its formula (Basu et al. 2021, Alg. 1; llama.cpp llama_sampler_mirostat)."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive.sampling import mirostat, mirostat_v1

NEG_INF = float("-inf")


def zipf_logits(s: float, vocab: int) -> torch.Tensor:
    """Logits of p_i proportional to i^-s (rank i = 1 .. vocab)."""
    return -s * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64)).float()


def k_of(logits: torch.Tensor, mu: float, m: int = 100) -> int:
    return int(mirostat_v1.keep_k(logits.unsqueeze(0), torch.tensor([mu]), torch.tensor([m]))[0])


def test_exact_zipf_row_gives_its_exponent() -> None:
    top = torch.topk(zipf_logits(1.2, 1000), 100).values.unsqueeze(0)
    s = mirostat_v1.zipf_exponent(top, torch.tensor([100])).item()
    assert s == pytest.approx(1.2, rel=1e-6)


def test_k_follows_the_formula() -> None:
    # s = 1.2, eps = 0.2, N = 1000, mu = 10: ((0.2 * 2^10) / (1 - 1000^-0.2))^(1/1.2) = 107.35
    expected = ((0.2 * 2**10) / (1 - 1000 ** -0.2)) ** (1 / 1.2)
    assert expected == pytest.approx(107.349, abs=1e-3)
    logits = zipf_logits(1.2, 1000)
    assert k_of(logits, 10.0) == 107
    assert mirostat_v1.keep_k_reference(logits, 10.0, 100) == 107
    masked = logits.unsqueeze(0).clone()
    mirostat_v1.apply_keep_set_(masked, torch.tensor([10.0]), torch.tensor([100]))
    assert (masked > NEG_INF).sum().item() == 107
    assert torch.equal(masked[0, :107], logits[:107])


def test_s_equal_one_uses_the_limit_of_the_formula() -> None:
    # eps -> 0: eps / (1 - N^-eps) -> 1 / ln N, so k = 2^5 / ln 1000 = 4.63
    assert k_of(zipf_logits(1.0, 1000), 5.0) == 4
    assert mirostat_v1.keep_k_reference(zipf_logits(1.0, 1000), 5.0, 100) == 4


def test_flat_top_keeps_everything_or_the_top_and_its_ties() -> None:
    flat = torch.zeros(100)  # s = 0: k = N when 2^mu / (N - 1) > 1, else 1
    assert k_of(flat, 5.0) == 1  # 32 / 99
    assert k_of(flat, 10.0) == 100  # 1024 / 99
    masked = flat.unsqueeze(0).clone()
    mirostat_v1.apply_keep_set_(masked, torch.tensor([5.0]), torch.tensor([100]))
    assert (masked > NEG_INF).all()  # k = 1, but all 100 tie with the top token


def test_tokens_tied_with_the_kth_are_kept_together() -> None:
    # [5, 3, 3, 0]: s = (2 ln 2 + 3 ln(4/3)) / (ln^2 2 + ln^2 1.5 + ln^2(4/3)) = 3.091;
    # mu = 3 -> k = 2.53
    logits = torch.tensor([[5.0, 3.0, 3.0, 0.0]])
    assert k_of(logits[0], 3.0) == 2
    mirostat_v1.apply_keep_set_(logits, torch.tensor([3.0]), torch.tensor([100]))
    assert logits.tolist() == [[5.0, 3.0, 3.0, NEG_INF]]


def test_m_limits_the_fit_to_the_top_m_tokens() -> None:
    top = torch.tensor([[5.0, 3.0, 3.0, 0.0]])
    s = mirostat_v1.zipf_exponent(top, torch.tensor([2])).item()
    assert s == pytest.approx(2 / math.log(2))  # one gap: t_1 * 2 / t_1^2


def test_neg_inf_entries_are_left_out_of_the_fit() -> None:
    logits = torch.tensor([[2.0, NEG_INF, 1.0, NEG_INF]])
    s = mirostat_v1.zipf_exponent(torch.topk(logits, 4).values, torch.tensor([100])).item()
    assert s == pytest.approx(1 / math.log(2))  # only the pair (2, 1) enters the fit
    single = torch.tensor([[NEG_INF, 2.0, NEG_INF]])
    lse = mirostat_v1.apply_keep_set_(single, torch.tensor([5.0]), torch.tensor([100]))
    assert single.tolist() == [[NEG_INF, 2.0, NEG_INF]] and lse.item() == pytest.approx(2.0)


@pytest.mark.parametrize(("mu", "expected"), [(80.0, 1000), (-5.0, 1), (0.0, 1)])
def test_extreme_mu(mu: float, expected: int) -> None:
    assert k_of(zipf_logits(1.2, 1000), mu) == expected


def test_kept_lse_feeds_the_v2_surprise_and_update() -> None:
    logits = torch.tensor([[5.0, 3.0, 3.0, 0.0]])
    lse = mirostat_v1.apply_keep_set_(logits, torch.tensor([3.0]), torch.tensor([100]))
    assert lse.item() == pytest.approx(math.log(math.exp(5) + 2 * math.exp(3)), rel=1e-6)
    assert mirostat_v1.update_mu is mirostat.update_mu
    assert mirostat_v1.observed_surprise is mirostat.observed_surprise
    assert mirostat_v1.initial_mu(5.0) == 10.0


def test_fast_k_matches_reference_per_row() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3000, generator=g) * torch.linspace(0.5, 4, 12).unsqueeze(-1)
    mu = torch.linspace(1.0, 14.0, 12)
    m = torch.tensor([2, 3, 10, 50, 100, 100, 100, 200, 1000, 100, 7, 100])
    k = mirostat_v1.keep_k(x, mu, m)
    expected = [mirostat_v1.keep_k_reference(x[r], mu[r].item(), int(m[r])) for r in range(12)]
    assert k.tolist() == expected


def test_params() -> None:
    assert [(p.key, p.interval()) for p in mirostat_v1.PARAMS] == [
        ("mirostat_tau", "(0, 40]"), ("mirostat_eta", "(0, 1]"), ("mirostat_m", "[2, 1000]")
    ]

