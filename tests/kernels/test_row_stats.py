"""The row_stats Triton kernel (run by the interpreter on CPU) against its float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_compare import assert_rel_rms, sparse_strided_logits

from vllm_adaptive.kernels import row_stats as module
from vllm_adaptive.kernels.row_stats import (
    RowStats,
    row_stats,
    row_stats_reference,
    row_stats_torch,
    row_stats_triton,
)

TOL = 1e-5  # float32 accumulation over up to 32k entries, inputs upcast exactly
NEG_INF = float("-inf")


def nan_filled(k: int) -> RowStats:
    """Outputs poisoned so that an element the kernel does not write fails the comparison."""
    floats = [torch.full((k,), float("nan")) for _ in range(5)]
    return RowStats(*floats, torch.full((k,), -1, dtype=torch.int32))


def awkward_rows(vocab: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Rows with -inf entries, all-equal values, one finite logit, nothing finite, big values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, vocab, generator=g) * 3
    x[0, ::3] = NEG_INF
    x[1] = 1.5
    x[2] = NEG_INF
    x[2, vocab // 2] = -4.0
    x[3] = NEG_INF
    x[4] *= 20  # exp would overflow without the running max
    return x.to(dtype)


def assert_stats_close(actual: RowStats, expected: RowStats, what: str) -> None:
    for name in RowStats._fields:
        a, e = getattr(actual, name), getattr(expected, name)
        if name == "count":
            assert torch.equal(a, e), f"{what}: count {a.tolist()} != {e.tolist()}"
        else:
            assert_rel_rms(a, e, TOL, f"{what}: {name}")


def test_kernel_runs_in_the_interpreter() -> None:
    assert type(module._row_stats_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 32003])
def test_matches_reference(vocab: int, dtype: torch.dtype) -> None:
    x = awkward_rows(vocab, dtype)
    got = row_stats_triton(x, out=nan_filled(x.shape[0]))
    assert_stats_close(got, row_stats_reference(x), f"V={vocab} {dtype}")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_selected_rows_in_any_order(index_dtype: torch.dtype) -> None:
    x = awkward_rows(333, torch.float32, seed=1)
    rows = torch.tensor([4, 0, 2], dtype=index_dtype)
    got = row_stats_triton(x, rows, out=nan_filled(3))
    assert_stats_close(got, row_stats_reference(x[[4, 0, 2]]), "rows [4, 0, 2]")


def test_small_block_loops_over_the_row() -> None:
    x = awkward_rows(1000, torch.float32, seed=2)
    got = row_stats_triton(x, out=nan_filled(5), block=16)
    assert_stats_close(got, row_stats_reference(x), "block 16")


def test_empty_selection_launches_nothing() -> None:
    got = row_stats_triton(torch.zeros(3, 10), torch.empty(0, dtype=torch.long))
    assert all(field.shape == (0,) for field in got)


def test_known_values() -> None:
    x = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    x[1] = 2.0
    got = row_stats_triton(x, out=nan_filled(2))
    assert got.entropy.tolist() == pytest.approx([1.5 * math.log(2), math.log(4)], rel=1e-6)
    assert got.lse.tolist() == pytest.approx([0.0, 2.0 + math.log(4)], abs=1e-6)
    assert got.count.tolist() == [3, 4]
    assert got.std.tolist() == pytest.approx([math.sqrt(2 / 9) * math.log(2), 0.0], abs=1e-6)


def test_column_strided_view() -> None:
    x = awkward_rows(1000, torch.float32, seed=3)
    transposed = x.t().contiguous().t()  # same values, strides (1, 5)
    assert transposed.stride() == (1, 5)
    got = row_stats_triton(transposed, out=nan_filled(5))
    assert_stats_close(got, row_stats_reference(x), "column stride 5")


@pytest.mark.parametrize("with_rows", [False, True])
def test_row_offsets_beyond_int32(with_rows: bool) -> None:
    # Row 2 starts 2 * (2**30 + 16) > 2**31 elements in: row * stride overflows int32 unless the
    # kernel widens to int64 first. The view sits 2**31 elements into a sparse file mapping, so
    # a wrapped (negative) offset would still land inside the mapping and fail the comparison
    # instead of crashing the test process. Only the pages of the three rows are ever touched.
    stride = 2**30 + 16
    with sparse_strided_logits(3, 500, stride, torch.float16, lead=2**31) as x:
        x.copy_(torch.randn(3, 500, generator=torch.Generator().manual_seed(4)).half() * 4 + 1)
        rows = torch.tensor([2, 1], dtype=torch.int32) if with_rows else None
        got = row_stats_triton(x, rows, out=nan_filled(2 if with_rows else 3))
        expected = row_stats_reference(x, rows)
    assert_stats_close(got, expected, "row offset > 2**31")


def test_cpu_dispatch_is_the_float32_torch_path() -> None:
    x = awkward_rows(100, torch.float32)
    for a, b in zip(row_stats(x), row_stats_torch(x)):
        assert torch.equal(a, b)
    assert_stats_close(row_stats_torch(x), row_stats_reference(x), "torch path")


def test_validation_names_expected_and_actual() -> None:
    with pytest.raises(ValueError, match=r"2-D \[rows, vocab\], got shape \(10,\)"):
        row_stats_triton(torch.zeros(10))
    with pytest.raises(ValueError, match=r"dtype must be one of .*got torch.float64"):
        row_stats_triton(torch.zeros(2, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"1-D int32/int64 index tensor \[K\], got shape \(2, 1\)"):
        row_stats_triton(torch.zeros(2, 10), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"out.entropy must be a contiguous \[2\] torch.float32"):
        bad = nan_filled(2)._replace(entropy=torch.zeros(3))
        row_stats_triton(torch.zeros(2, 10), out=bad)
