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


def sort_reference_keep(row: torch.Tensor, typical_p: float) -> torch.Tensor:
    """The definition by a full sort in float64 (HF's method): bool mask of tokens kept."""
    x = row.double()
    finite = x > NEG_INF
    keep = torch.zeros_like(finite)
    if not finite.any():
        return keep
    if typical_p >= 1.0:
        return finite
    logp = torch.log_softmax(x, dim=-1)
    p = logp.exp()
    entropy = -(torch.where(finite, p * logp, 0.0)).sum()
    score = torch.where(finite, (-logp - entropy).abs(), torch.inf)
    ordered, order = torch.sort(score, stable=True)
    reached = int((p[order].cumsum(0) < typical_p).sum().clamp(max=x.shape[0] - 1))
    return finite & ((score <= ordered[reached]) | (x == x.max()))


def awkward_rows(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, vocab, generator=g) * 3.0
    x[1, ::3] = NEG_INF
    x[2] = 0.5  # every token tied: one bin holds the row
    x[3] = NEG_INF
    x[3, 5] = 2.0
    x[4] = NEG_INF
    x[5, : vocab // 2] = x[5, 0]  # half the row tied at one value
    x[6, :4] += 12.0  # peaked
    x[7] = torch.randn(vocab, generator=g) * 0.3  # flat: scores crowd near 0
    return x


@pytest.mark.parametrize("method", ["bins", "sort"])
@pytest.mark.parametrize(("vocab", "seed"), [(7, 0), (1000, 1), (50_000, 2)])
def test_both_selections_match_a_sort_based_float64_reference(
    method: str, vocab: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = awkward_rows(vocab, seed)
    p = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 0.6])
    if method == "bins":  # the bins find every cut themselves: no row falls back to the sort
        monkeypatch.setattr(typical, "_cut_by_sort", lambda *args: pytest.fail("a row was sorted"))
    remove = typical.typical_remove_mask(x, p, method)
    for r in range(x.shape[0]):
        want = sort_reference_keep(x[r], float(p[r]))
        got = ~remove[r] & (x[r] > NEG_INF)
        assert torch.equal(got, want), (method, vocab, r, int(got.sum()), int(want.sum()))


def test_bins_and_sort_cut_at_the_same_token_even_at_float32_resolution() -> None:
    """Scores 1e-6 apart (logits with std 0.005): float32 may order them differently from
    float64, but both selections work on the same float32 scores and keep the same set."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 40_000, generator=g) * 0.005
    p = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    assert torch.equal(typical.typical_remove_mask(x, p, "bins"), typical.typical_remove_mask(x, p, "sort"))


def test_bins_fall_back_to_the_sort_where_float32_bin_sums_misjudge_the_bin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bin masses are float32; a row whose reached bin they misjudged is cut by the sort."""
    x = awkward_rows(3000, 3)
    p = torch.full((8,), 0.8)
    want = typical.typical_remove_mask(x, p, "sort")
    sorted_rows: list[int] = []
    real_sort = typical._cut_by_sort

    def counting_sort(scores: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        sorted_rows.append(scores.shape[0])
        return real_sort(scores, *args)

    monkeypatch.setattr(typical, "_cut_by_sort", counting_sort)
    real_index_add = torch.Tensor.index_add_

    def skewed_index_add(self: torch.Tensor, dim: int, index: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        out = real_index_add(self, dim, index, source)
        out[1::2] += 0.05  # every odd bin reads 5% too much mass
        return out

    monkeypatch.setattr(torch.Tensor, "index_add_", skewed_index_add)
    got = typical.typical_remove_mask(x, p, "bins")
    assert torch.equal(got, want)
    assert sorted_rows and sum(sorted_rows) < x.shape[0]  # only the misjudged rows were sorted
