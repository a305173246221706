"""The CPU path of row_stats (float32 torch) against the float64 definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_adaptive.kernels.row_stats import row_stats, row_stats_reference, row_stats_torch

NEG_INF = float("-inf")


def assert_matches_reference(x: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    got, want = row_stats_torch(x, rows), row_stats_reference(x, rows)
    assert torch.equal(got.count, want.count)
    for field in ("row_max", "lse", "entropy", "mean", "std"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == torch.float32 and not torch.isnan(a).any(), field
        same_inf = torch.isinf(a) == torch.isinf(b)
        assert same_inf.all() and torch.equal(a[torch.isinf(a)], b[torch.isinf(b)]), field
        finite = ~torch.isinf(b)
        scale = 1.0 + b[finite].abs()
        assert ((a[finite] - b[finite]).abs() <= 2e-5 * scale).all(), field


def test_edge_rows() -> None:
    x = torch.randn(6, 1001) * 4 + 30.0  # offset logits: the entropy must not cancel away
    x[1, :900] = NEG_INF
    x[2] = NEG_INF  # nothing finite
    x[3, 1:] = NEG_INF  # a single finite logit
    x[4] = 0.0  # all tied
    x[5, ::2] = NEG_INF
    assert_matches_reference(x)
    assert_matches_reference(x, torch.tensor([5, 0, 3]))
    stats = row_stats_torch(x)
    assert stats.lse[2] == NEG_INF and stats.entropy[2] == 0.0 and stats.count[2] == 0
    assert stats.entropy[3] == 0.0 and stats.std[3] == 0.0


def test_cpu_dispatch_uses_the_float32_path() -> None:
    x = torch.randn(3, 77)
    for a, b in zip(row_stats(x), row_stats_torch(x)):
        assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(1, 300),
    scale=st.floats(0.01, 30.0),
    offset=st.floats(-50.0, 50.0),
    masked=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_rows(vocab: int, scale: float, offset: float, masked: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, vocab, generator=gen) * scale + offset
    x[torch.rand(4, vocab, generator=gen) < masked] = NEG_INF
    assert_matches_reference(x)


SAMPLER_FIELDS = [("row_max", "lse", "entropy"), ("row_max", "std"), ("lse",), ("entropy", "count")]


@pytest.mark.parametrize("fields", SAMPLER_FIELDS)
def test_only_the_fields_asked_for_are_computed_and_they_match_the_reference(fields: tuple[str, ...]) -> None:
    x = torch.randn(6, 1001) * 4 + 30.0
    x[1, :900] = NEG_INF
    x[2] = NEG_INF
    x[3, 1:] = NEG_INF
    x[4] = 0.0
    x[5, ::2] = NEG_INF
    for rows in (None, torch.tensor([5, 0, 3])):
        got, want = row_stats_torch(x, rows, fields), row_stats_reference(x, rows)
        for field in got._fields:
            a, b = getattr(got, field), getattr(want, field)
            if field not in fields and not (field == "row_max"):  # the max is always at hand
                assert a is None, field
                continue
            if field == "count":
                assert torch.equal(a, b)
                continue
            assert not torch.isnan(a).any(), field
            assert torch.equal(torch.isinf(a), torch.isinf(b)), field
            finite = ~torch.isinf(b)
            assert ((a[finite] - b[finite]).abs() <= 2e-5 * (1.0 + b[finite].abs())).all(), field


def test_an_unknown_field_is_named() -> None:
    with pytest.raises(ValueError, match="unknown field.*'variance'"):
        row_stats_torch(torch.zeros(1, 3), fields=("lse", "variance"))
