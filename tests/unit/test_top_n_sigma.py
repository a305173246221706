"""Top-n-sigma against hand-computed keep-sets (llama.cpp llama_sampler_top_n_sigma)."""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive.sampling import top_n_sigma

NEG_INF = float("-inf")
LOGITS = [4.0, 3.0, 2.0, 1.0, 0.0]  # max 4, mean 2, population std sqrt(2) = 1.4142


def kept(logits: list[float], n: float) -> list[bool]:
    x = torch.tensor([logits])
    top_n_sigma.apply_top_n_sigma_(x, torch.tensor([n]))
    return (x[0] > NEG_INF).tolist()


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1.0, [True, True, False, False, False]),  # threshold 2.586
        (2.0, [True, True, True, False, False]),  # 1.172
        (2.9, [True] * 5),  # -0.101
        (1e-6, [True, False, False, False, False]),
    ],
)
def test_keeps_logits_within_n_sigma_of_the_max(n: float, expected: list[bool]) -> None:
    assert kept(LOGITS, n) == expected
    assert top_n_sigma.keep_set_reference(torch.tensor(LOGITS), n).tolist() == expected


def test_neg_inf_entries_take_no_part_in_the_statistics() -> None:
    assert kept(LOGITS + [NEG_INF, NEG_INF], 1.0) == [True, True, False, False, False, False, False]


def test_sigma_is_the_population_standard_deviation() -> None:
    # [1, -1]: population std 1 -> threshold -0.5 drops -1; the sample std would keep it.
    assert kept([1.0, -1.0], 1.5) == [True, False]


def test_all_equal_row_is_kept() -> None:
    assert kept([0.5] * 6, 1e-3) == [True] * 6


def test_kept_set_does_not_depend_on_temperature() -> None:
    x = torch.randn(4, 500, generator=torch.Generator().manual_seed(0)) * 3
    a, b = x.clone(), x / 0.37
    n = torch.full((4,), 1.3)
    top_n_sigma.apply_top_n_sigma_(a, n)
    top_n_sigma.apply_top_n_sigma_(b, n)
    assert torch.equal(a > NEG_INF, b > NEG_INF)


def test_params() -> None:
    (param,) = top_n_sigma.PARAMS
    assert (param.key, param.interval()) == ("top_n_sigma", "(0, 100]")
    assert top_n_sigma.TOP_N_SIGMA_DEFAULT == 1.0
