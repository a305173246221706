"""The threshold_mask Triton kernel (run by the interpreter on CPU) against its torch reference.

The op works in place, so "unwritten" means "left as it was": every comparison is bitwise over
the whole tensor, the rows the op must not touch included.
"""

from __future__ import annotations

import pytest
import torch
from kernel_compare import assert_bitwise_equal, sparse_strided_logits

from vllm_adaptive.kernels import threshold_mask as module
from vllm_adaptive.kernels.threshold_mask import (
    threshold_mask_,
    threshold_mask_reference_,
    threshold_mask_triton_,
)

NEG_INF = float("-inf")


def awkward_rows(vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, vocab, generator=g) * 3
    x[0, ::3] = NEG_INF
    x[1] = 0.5  # all equal to its threshold below: all kept
    x[2] = NEG_INF
    x[2, vocab // 2] = -4.0
    x[3] = NEG_INF
    return x.to(dtype)


# One threshold per row of awkward_rows: a cut, a tie with every entry, above the single finite
# logit, NaN (keeps everything), -inf (keeps everything).
THRESHOLDS = torch.tensor([0.25, 0.5, 1.0, float("nan"), NEG_INF])


def both(
    x: torch.Tensor, threshold: torch.Tensor, rows: torch.Tensor | None = None, **kw: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel result, reference result) on two copies of x."""
    got, expected = x.clone(), x.clone()
    threshold_mask_triton_(got, threshold, rows, **kw)
    threshold_mask_reference_(expected, threshold, rows)
    return got, expected


def test_kernel_runs_in_the_interpreter() -> None:
    assert type(module._threshold_mask_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_matches_reference(vocab: int, dtype: torch.dtype) -> None:
    got, expected = both(awkward_rows(vocab, dtype), THRESHOLDS)
    assert_bitwise_equal(got, expected, f"V={vocab} {dtype}")


def test_masks_below_keeps_ties_and_leaves_neg_inf() -> None:
    x = torch.tensor([[3.0, 1.0, NEG_INF, 2.0, 1.999]])
    threshold_mask_triton_(x, torch.tensor([2.0]))
    assert x.tolist() == [[3.0, NEG_INF, NEG_INF, 2.0, NEG_INF]]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_only_selected_rows_change(index_dtype: torch.dtype) -> None:
    x = awkward_rows(1000, torch.float32, seed=1)
    rows = torch.tensor([4, 0], dtype=index_dtype)
    got, expected = both(x, torch.tensor([0.0, 1.0]), rows)
    assert_bitwise_equal(got, expected, "rows [4, 0]")
    assert_bitwise_equal(got[1:4], x[1:4], "rows not selected")
    assert (got[0] > NEG_INF).sum() < (x[0] > NEG_INF).sum()


def test_rows_with_nothing_below_are_bitwise_untouched() -> None:
    x = awkward_rows(777, torch.float32, seed=2)
    x[1, 5] = -0.0  # a signed zero survives because it is never rewritten
    got, _ = both(x, torch.full((5,), NEG_INF))
    assert_bitwise_equal(got, x, "threshold -inf")


def test_small_blocks_cover_the_row() -> None:
    got, expected = both(awkward_rows(1000, torch.float32, seed=3), THRESHOLDS, block=16)
    assert_bitwise_equal(got, expected, "block 16")


def test_column_strided_view() -> None:
    x = awkward_rows(1000, torch.float32, seed=4)
    strided = x.t().contiguous().t()
    got, expected = both(strided, THRESHOLDS)
    assert_bitwise_equal(got.contiguous(), expected.contiguous(), "column stride 5")


def test_empty_selection_changes_nothing() -> None:
    x = awkward_rows(10, torch.float32)
    got, _ = both(x, torch.empty(0), torch.empty(0, dtype=torch.long))
    assert_bitwise_equal(got, x, "no rows")


@pytest.mark.parametrize("with_rows", [False, True])
def test_row_offsets_beyond_int32(with_rows: bool) -> None:
    # See test_row_stats.py: row 2 starts past 2**31 elements in a sparse mapping, so a wrapped
    # int32 offset would write into the wrong (still mapped) place and fail the comparison.
    stride = 2**30 + 16
    values = torch.randn(3, 500, generator=torch.Generator().manual_seed(5)).half()
    rows = torch.tensor([2, 0], dtype=torch.int32) if with_rows else None
    threshold = torch.tensor([0.0, 0.5]) if with_rows else torch.tensor([0.0, 0.5, -0.5])
    expected = threshold_mask_reference_(values.clone(), threshold, rows)
    with sparse_strided_logits(3, 500, stride, torch.float16, lead=2**31) as x:
        x.copy_(values)
        threshold_mask_triton_(x, threshold, rows)
        got = x.clone()
        wrapped_target = x.as_strided((500,), (1,), 32).clone()  # where int32 offsets would land
    assert_bitwise_equal(got, expected, "row offset > 2**31")
    assert not wrapped_target.any(), "something was written outside the view"


def test_cpu_dispatch_is_the_reference() -> None:
    x = awkward_rows(100, torch.float32)
    got, expected = x.clone(), x.clone()
    threshold_mask_(got, THRESHOLDS)
    threshold_mask_reference_(expected, THRESHOLDS)
    assert_bitwise_equal(got, expected)


def test_validation_names_expected_and_actual() -> None:
    x = torch.zeros(3, 10)
    with pytest.raises(ValueError, match=r"float32 \[3\] \(one per row\), got torch.float32 \[2\]"):
        threshold_mask_triton_(x, torch.zeros(2))
    with pytest.raises(ValueError, match=r"\(one per selected row\), got torch.float64 \[1\]"):
        threshold_mask_triton_(x, torch.zeros(1, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"2-D \[rows, vocab\], got shape \(3, 10, 1\)"):
        threshold_mask_triton_(x.unsqueeze(-1), torch.zeros(3))
