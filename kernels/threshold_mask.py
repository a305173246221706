"""Set every logit below its row's threshold to -inf, in place: the threshold samplers' mask.

Mirostat v2 (logit >= lse - mu ln 2), epsilon / eta (p >= cutoff, i.e. logit >= lse + ln cutoff),
top-n-sigma (logit >= max - n std) and top-k in threshold form all keep the tokens whose logit is
at least a per-row threshold computed from row statistics (see `row_stats`). This op applies such
thresholds to logits [R, V] in place.

`threshold[i]` applies to row `rows[i]` (to row i when `rows` is None); other rows are not
touched, and within a row only the elements that become -inf are written, so a row whose
threshold is -inf or NaN stays bitwise as it was. The comparison is `float32(logit) < threshold`
for every input dtype. Ties with the threshold are kept.

`threshold_mask_` runs the Triton kernel on CUDA tensors and `threshold_mask_reference_` (plain
torch) on CPU tensors: vLLM's CPU build disables Triton.
"""

from __future__ import annotations

import torch

from .row_stats import check_rows

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs may lack Triton
    triton = None


def check_threshold(
    logits: torch.Tensor, threshold: torch.Tensor, rows: torch.Tensor | None, what: str
) -> int:
    k = check_rows(logits, rows, what)
    if threshold.shape != (k,) or threshold.dtype != torch.float32:
        per = "selected row" if rows is not None else "row"
        raise ValueError(
            f"{what}: threshold must be float32 [{k}] (one per {per}), "
            f"got {threshold.dtype} {list(threshold.shape)}"
        )
    if threshold.device != logits.device:
        raise ValueError(
            f"{what}: threshold must be on {logits.device} like logits, got {threshold.device}"
        )
    return k


def threshold_mask_(
    logits: torch.Tensor, threshold: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask `logits[rows[i], j] < threshold[i]` to -inf in place; returns `logits`."""
    check_threshold(logits, threshold, rows, "threshold_mask_")
    if logits.is_cuda and triton is not None:
        return threshold_mask_triton_(logits, threshold, rows)
    return threshold_mask_reference_(logits, threshold, rows)


def threshold_mask_reference_(
    logits: torch.Tensor, threshold: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain torch: the CPU path and the tests' reference."""
    check_threshold(logits, threshold, rows, "threshold_mask_reference_")
    if rows is None:
        logits.masked_fill_(logits.float() < threshold.unsqueeze(-1), float("-inf"))
        return logits
    rows = rows.long()
    selected = logits.index_select(0, rows)
    selected.masked_fill_(selected.float() < threshold.unsqueeze(-1), float("-inf"))
    logits.index_copy_(0, rows, selected)
    return logits


def threshold_mask_triton_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    rows: torch.Tensor | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel (any device Triton runs on; CPU under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("threshold_mask_triton_ needs Triton, which is not installed")
    k = check_threshold(logits, threshold, rows, "threshold_mask_triton_")
    vocab = logits.shape[1]
    if k == 0:
        return logits
    if block is None:
        block = max(16, min(1024, triton.next_power_of_2(vocab)))
    grid = (k, triton.cdiv(vocab, block))
    _threshold_mask_kernel[grid](
        logits,
        threshold,
        rows if rows is not None else threshold,  # never read when HAS_ROWS is False
        vocab,
        logits.stride(0),
        logits.stride(1),
        HAS_ROWS=rows is not None,
        BLOCK=block,
    )
    return logits


if triton is not None:

    @triton.jit
    def _threshold_mask_kernel(
        logits_ptr,
        threshold_ptr,
        rows_ptr,
        vocab,
        stride_row,
        stride_col,
        HAS_ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        if HAS_ROWS:
            row = tl.load(rows_ptr + pid).to(tl.int64)
        else:
            row = pid.to(tl.int64)
        threshold = tl.load(threshold_ptr + pid)
        offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_row = offs < vocab
        # int64 before multiplying by the stride: row * stride_row overflows int32 on big batches.
        ptrs = logits_ptr + row * stride_row + offs * stride_col
        x = tl.load(ptrs, mask=in_row, other=0.0)
        drop = in_row & (x.to(tl.float32) < threshold)
        tl.store(ptrs, tl.full((BLOCK,), float("-inf"), x.dtype), mask=drop)
