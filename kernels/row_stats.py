"""Per-row statistics of a logits matrix in one pass: the numbers entropy-aware samplers need.

For each row of logits [R, V] (float32, float16 or bfloat16; computed in float32):
  row_max  the largest logit
  lse      logsumexp, the softmax normaliser
  entropy  Shannon entropy of softmax(row), in nats
  mean     mean of the finite logits
  std      population standard deviation of the finite logits (divides by the count, as
           llama.cpp's top-n-sigma does)
  count    number of finite logits (int32)

`-inf` entries are masked tokens: they carry no probability and are left out of mean, std and
count. A row of only `-inf` gives row_max = lse = -inf and zeros elsewhere. Inputs must not hold
NaN or +inf.

The Triton kernel reads each row once, combining blocks with the online-softmax recurrence
(Milakov & Gimelshein 2018) extended by the running sum of p * logit, which gives the entropy as
H = lse - E_p[logit], and with Chan et al.'s pairwise update for mean and variance.
`row_stats` runs the kernel on CUDA tensors and `row_stats_torch` (float32 torch, a few
vectorised passes) elsewhere: vLLM's CPU build disables Triton. On that path each pass costs a
read of the whole [R, V] matrix, so a caller names the statistics it reads (`fields`) and only
those are computed (the others are None); the kernel computes all of them in its one pass.
`row_stats_reference` (float64) is the definition the tests hold both to.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs may lack Triton
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class RowStats(NamedTuple):
    """Statistics of K rows; every field is [K], float32 except `count` (int32)."""

    row_max: torch.Tensor
    lse: torch.Tensor
    entropy: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor


def check_rows(logits: torch.Tensor, rows: torch.Tensor | None, what: str) -> int:
    """Validate logits [R, V] and an optional row index [K]; returns K."""
    if logits.dim() != 2:
        raise ValueError(
            f"{what}: logits must be 2-D [rows, vocab], got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] == 0:
        raise ValueError(
            f"{what}: logits need at least one column, got shape {tuple(logits.shape)}"
        )
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{what}: logits dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {logits.dtype}"
        )
    if rows is None:
        return logits.shape[0]
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{what}: rows must be a 1-D int32/int64 index tensor [K], "
            f"got shape {tuple(rows.shape)} dtype {rows.dtype}"
        )
    if rows.device != logits.device:
        raise ValueError(f"{what}: rows must be on {logits.device} like logits, got {rows.device}")
    return rows.shape[0]


FIELDS = frozenset(RowStats._fields)


def row_stats(
    logits: torch.Tensor, rows: torch.Tensor | None = None, fields: Iterable[str] | None = None
) -> RowStats:
    """Statistics of `logits[rows]` (all rows when `rows` is None): Triton on CUDA, else torch.

    `fields` (default: all) names the statistics the caller reads; on the torch path the others
    are not computed and are None. The Triton kernel always returns all of them.
    """
    check_rows(logits, rows, "row_stats")
    if logits.is_cuda and triton is not None:
        return row_stats_triton(logits, rows)
    return row_stats_torch(logits, rows, fields)


def row_stats_torch(
    logits: torch.Tensor, rows: torch.Tensor | None = None, fields: Iterable[str] | None = None
) -> RowStats:
    """float32 torch, shifted by the row max: the CPU path (within float32 rounding of the reference).

    With `fields`, only those statistics (None for the others), in as few passes over the
    matrix as they need.
    """
    check_rows(logits, rows, "row_stats_torch")
    x = (logits if rows is None else logits.index_select(0, rows.long())).float()
    if fields is not None:
        wanted = frozenset(fields)
        if not wanted <= FIELDS:
            raise ValueError(
                f"row_stats_torch: unknown field(s) {sorted(wanted - FIELDS)}; "
                f"the statistics are {list(RowStats._fields)}"
            )
        if wanted != FIELDS:
            return _some_row_stats(x, wanted)
    finite = x > float("-inf")
    count = finite.sum(dim=-1)
    row_max = x.amax(dim=-1)
    # Shift by the max so exp and the entropy's sum stay in range; all -inf rows shift by 0.
    # Masked entries: exp(-inf) = 0 carries no weight, and they are zeroed where summed.
    shift = torch.where(count > 0, row_max, 0.0)
    shifted = (x - shift.unsqueeze(-1)).masked_fill_(~finite, 0.0)
    weights = shifted.exp().masked_fill_(~finite, 0.0)
    total = weights.sum(dim=-1)
    log_total = total.log()  # -inf for an all -inf row
    lse = shift + log_total
    # H = log Z - E_p[x - shift], with Z the shifted sum (vecdot: no [K, V] temporary).
    expected = torch.linalg.vecdot(weights, shifted) / total.clamp(min=torch.finfo(torch.float32).tiny)
    entropy = torch.where(count > 0, log_total - expected, 0.0).clamp(min=0.0)
    n = count.clamp(min=1).float()
    mean_shifted = shifted.sum(dim=-1) / n
    centered = shifted.sub_(mean_shifted.unsqueeze(-1)).masked_fill_(~finite, 0.0)
    var = torch.linalg.vecdot(centered, centered) / n
    mean = torch.where(count > 0, mean_shifted + shift, 0.0)
    return RowStats(
        row_max=row_max,
        lse=lse,
        entropy=entropy,
        mean=mean,
        std=var.sqrt(),
        count=count.to(torch.int32),
    )


def _some_row_stats(x: torch.Tensor, wanted: frozenset[str]) -> RowStats:
    """The statistics named in `wanted` of float32 rows x [K, V] (and the row max, needed for
    all of them); None for the others.

    Same formulas as `row_stats_torch`'s full path, with fewer passes: a masked (-inf) entry
    needs no mask for the exponential (exp(-inf) = 0), only where it is multiplied (0 * -inf),
    and only rows that hold one take that masked path.
    """
    out: dict[str, torch.Tensor | None] = dict.fromkeys(RowStats._fields)
    row_max = x.amax(dim=-1)
    has_finite = row_max > float("-inf")
    out["row_max"] = row_max
    if wanted & {"lse", "entropy"}:
        shift = torch.where(has_finite, row_max, 0.0)
        shifted = x - shift.unsqueeze(-1)
        weights = shifted.exp()
        total = weights.sum(dim=-1)
        log_total = total.log()  # -inf for an all -inf row
        if "lse" in wanted:
            out["lse"] = shift + log_total
        if "entropy" in wanted:
            dot = _row_dot(weights, shifted)  # NaN where a row holds -inf
            masked = torch.isnan(dot)
            if bool(masked.any()):  # the CPU path: a host read costs nothing here
                which = masked.nonzero().squeeze(-1)
                part = shifted.index_select(0, which)
                part.masked_fill_(part == float("-inf"), 0.0)
                dot.index_copy_(0, which, _row_dot(weights.index_select(0, which), part))
            expected = dot / total.clamp(min=torch.finfo(torch.float32).tiny)
            out["entropy"] = torch.where(has_finite, log_total - expected, 0.0).clamp(min=0.0)
    if wanted & {"mean", "std", "count"}:
        # Rows without -inf (the usual case) need no mask; rows with one take the masked
        # formulas of the full path (found on the host: this is the CPU path).
        vocab = x.shape[-1]
        masked = x.amin(dim=-1) == float("-inf")
        count = torch.full_like(row_max, vocab, dtype=torch.int32)
        mean = x.sum(dim=-1) / vocab if wanted & {"mean", "std"} else None
        std = None
        if "std" in wanted:
            centered = x - mean.unsqueeze(-1)  # type: ignore[union-attr]
            std = (_row_dot(centered, centered) / vocab).sqrt()
        if bool(masked.any()):
            which = masked.nonzero().squeeze(-1)
            part = _masked_count_mean_std(x.index_select(0, which), row_max.index_select(0, which))
            count.index_copy_(0, which, part[0])
            if mean is not None:
                mean.index_copy_(0, which, part[1])
            if std is not None:
                std.index_copy_(0, which, part[2])
        out["count"] = count if "count" in wanted else None
        out["mean"] = mean if "mean" in wanted else None
        out["std"] = std
    return RowStats(**out)  # type: ignore[arg-type]


def _masked_count_mean_std(
    x: torch.Tensor, row_max: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """count (int32), mean and std of the finite logits of rows that hold -inf entries."""
    finite = x > float("-inf")
    count = finite.sum(dim=-1)
    shift = torch.where(count > 0, row_max, 0.0)
    shifted = (x - shift.unsqueeze(-1)).masked_fill_(~finite, 0.0)
    n = count.clamp(min=1).float()
    mean_shifted = shifted.sum(dim=-1) / n
    centered = shifted.sub_(mean_shifted.unsqueeze(-1)).masked_fill_(~finite, 0.0)
    mean = torch.where(count > 0, mean_shifted + shift, 0.0)
    return count.to(torch.int32), mean, (_row_dot(centered, centered) / n).sqrt()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product [K] of [K, V] matrices as a batched matmul: no [K, V] temporary
    (`torch.linalg.vecdot` on CPU multiplies into one, then sums)."""
    return torch.matmul(a.unsqueeze(-2), b.unsqueeze(-1)).view(-1)


def row_stats_reference(logits: torch.Tensor, rows: torch.Tensor | None = None) -> RowStats:
    """The definitions, in float64 torch, several passes; the CPU path and the tests' reference."""
    check_rows(logits, rows, "row_stats_reference")
    x = (logits if rows is None else logits.index_select(0, rows.long())).double()
    finite = x > float("-inf")
    count = finite.sum(dim=-1)
    row_max = x.amax(dim=-1)
    lse = torch.logsumexp(x, dim=-1)
    logp = x - lse.unsqueeze(-1)
    entropy = -torch.where(finite, logp.exp() * logp, 0.0).sum(dim=-1)
    entropy = torch.where(entropy > 0, entropy, 0.0)  # +0.0, never -0.0
    n = count.clamp(min=1).double()
    mean = torch.where(finite, x, 0.0).sum(dim=-1) / n
    var = torch.where(finite, (x - mean.unsqueeze(-1)) ** 2, 0.0).sum(dim=-1) / n
    return RowStats(
        row_max=row_max.float(),
        lse=lse.float(),
        entropy=entropy.float(),
        mean=mean.float(),
        std=var.sqrt().float(),
        count=count.to(torch.int32),
    )


def row_stats_triton(
    logits: torch.Tensor,
    rows: torch.Tensor | None = None,
    out: RowStats | None = None,
    block: int | None = None,
) -> RowStats:
    """Launch the Triton kernel (any device Triton runs on; CPU under TRITON_INTERPRET=1).

    `out` (optional) receives the results: six contiguous [K] tensors, float32 and int32 count.
    """
    if triton is None:
        raise RuntimeError("row_stats_triton needs Triton, which is not installed")
    k = check_rows(logits, rows, "row_stats_triton")
    vocab = logits.shape[1]
    if out is None:
        floats = torch.empty((5, k), dtype=torch.float32, device=logits.device)
        out = RowStats(*floats, torch.empty((k,), dtype=torch.int32, device=logits.device))
    for name, value in out._asdict().items():
        dtype = torch.int32 if name == "count" else torch.float32
        bad = value.shape != (k,) or value.dtype != dtype or value.device != logits.device
        if bad or not value.is_contiguous():
            raise ValueError(
                f"row_stats_triton: out.{name} must be a contiguous [{k}] {dtype} on "
                f"{logits.device}, got {list(value.shape)} {value.dtype} on {value.device}"
            )
    if k == 0:
        return out
    if block is None:
        block = max(16, min(4096, triton.next_power_of_2(vocab)))
    _row_stats_kernel[(k,)](
        logits,
        rows if rows is not None else logits,  # never read when HAS_ROWS is False
        *out,
        vocab,
        logits.stride(0),
        logits.stride(1),
        HAS_ROWS=rows is not None,
        BLOCK=block,
    )
    return out


if triton is not None:

    @triton.jit
    def _row_stats_kernel(
        logits_ptr,
        rows_ptr,
        max_ptr,
        lse_ptr,
        entropy_ptr,
        mean_ptr,
        std_ptr,
        count_ptr,
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
        # int64 before multiplying by the stride: row * stride_row overflows int32 on big batches.
        row_ptr = logits_ptr + row * stride_row
        cols = tl.arange(0, BLOCK)
        neg_inf = float("-inf")

        m = tl.full((), neg_inf, tl.float32)  # running max
        s = tl.zeros((), tl.float32)  # sum of exp(x - m)
        t = tl.zeros((), tl.float32)  # sum of exp(x - m) * (x - m)
        n = tl.zeros((), tl.float32)  # finite count
        mean = tl.zeros((), tl.float32)
        m2 = tl.zeros((), tl.float32)  # sum of squared deviations from mean
        for start in range(0, vocab, BLOCK):
            offs = start + cols
            in_row = offs < vocab
            x = tl.load(row_ptr + offs.to(tl.int64) * stride_col, mask=in_row, other=neg_inf)
            x = x.to(tl.float32)
            finite = x > neg_inf

            m_new = tl.maximum(m, tl.max(x, axis=0))
            # 0 instead of -inf while nothing finite has been seen, so no (-inf) - (-inf).
            ref = tl.where(m_new > neg_inf, m_new, 0.0)
            alpha = tl.exp(m - ref)
            shift = tl.where(m > neg_inf, m - ref, 0.0)
            d = tl.where(finite, x - ref, 0.0)
            e = tl.where(finite, tl.exp(d), 0.0)
            t = (t + s * shift) * alpha + tl.sum(e * d, axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new

            nb = tl.sum(finite.to(tl.float32), axis=0)
            mb = tl.sum(tl.where(finite, x, 0.0), axis=0) / tl.maximum(nb, 1.0)
            m2b = tl.sum(tl.where(finite, (x - mb) * (x - mb), 0.0), axis=0)
            n_new = n + nb
            delta = mb - mean
            mean = mean + delta * (nb / tl.maximum(n_new, 1.0))
            m2 = m2 + m2b + delta * delta * (n * nb / tl.maximum(n_new, 1.0))
            n = n_new

        nonempty = s > 0.0
        s_safe = tl.where(nonempty, s, 1.0)
        lse = tl.where(nonempty, m + tl.log(s_safe), neg_inf)
        entropy = tl.log(s_safe) - t / s_safe
        entropy = tl.where(nonempty & (entropy > 0.0), entropy, 0.0)  # +0.0, never -0.0
        tl.store(max_ptr + pid, m)
        tl.store(lse_ptr + pid, lse)
        tl.store(entropy_ptr + pid, entropy)
        tl.store(mean_ptr + pid, mean)
        tl.store(std_ptr + pid, tl.sqrt(m2 / tl.maximum(n, 1.0)))
        tl.store(count_ptr + pid, n.to(tl.int32))
