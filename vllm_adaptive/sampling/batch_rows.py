"""Row selection and per-row parameter checks shared by the batched samplers.

Every batched sampler takes logits [R, V] (float32, already divided by the request's
temperature), an optional `rows` index [K] naming the rows it applies to (every row when None),
and one parameter tensor [K] per parameter, entry i belonging to row `rows[i]`. Rows not named
are never written; `rows` must not repeat a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vllm_adaptive.kernels.row_stats import check_rows


# Off CUDA, `in_row_chunks` hands a sampler at most this many logits at once: its working
# memory (a few bytes per logit) stays a few MiB whatever the batch and vocabulary.
CPU_CHUNK_LOGITS = 1 << 20


def in_row_chunks(
    apply: Callable[..., torch.Tensor | None], logits: torch.Tensor, rows: torch.Tensor | None,
    *per_row: torch.Tensor,
) -> torch.Tensor | None:
    """`apply(logits, *per_row, rows)`, which masks rows in place and returns a value per
    selected row [K] or None, run over the selected rows in chunks of at most CPU_CHUNK_LOGITS
    logits (one row at a time beyond that vocabulary) off CUDA, and in one call on CUDA, where
    each chunk would cost kernel launches. `apply` must treat rows independently; with `rows`
    None it gets views of `logits` (its in-place writes land in `logits`). Besides bounding the
    working memory, a chunk's rows stay in cache between the passes over them."""
    count = logits.shape[0] if rows is None else rows.shape[0]
    step = max(1, CPU_CHUNK_LOGITS // max(logits.shape[1], 1))
    if logits.is_cuda or count <= step:
        return apply(logits, *per_row, rows)
    parts = []
    for start in range(0, count, step):
        stop = min(start + step, count)
        chunk = [value[start:stop] for value in per_row]
        if rows is None:
            parts.append(apply(logits[start:stop], *chunk, None))
        else:
            parts.append(apply(logits, *chunk, rows[start:stop]))
    return None if parts[0] is None else torch.cat(parts)


def check_batch(
    what: str, logits: torch.Tensor, rows: torch.Tensor | None, **params: torch.Tensor
) -> int:
    """Validate a sampler's inputs; returns K, the number of rows it applies to."""
    k = check_rows(logits, rows, what)
    if logits.dtype != torch.float32:
        raise ValueError(f"{what}: logits must be float32, got {logits.dtype}")
    for name, value in params.items():
        if not isinstance(value, torch.Tensor) or value.shape != (k,):
            shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"{what}: {name} must be a tensor [{k}] (one per selected row), got {shape}"
            )
        if value.device != logits.device:
            raise ValueError(
                f"{what}: {name} must be on {logits.device} like logits, got {value.device}"
            )
    return k


def selected(logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The selected rows [K, V]: a copy when `rows` is given, `logits` itself otherwise."""
    return logits if rows is None else logits.index_select(0, rows.long())


def write_rows_(
    logits: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor, changed: torch.Tensor
) -> None:
    """Copy `values[i]` into the logits row it came from, for the i where `changed[i]`.

    Off CUDA the changed rows are found on the host (free there); on CUDA, where that read
    would stall the stream, every selected row is written, an unchanged one with its own
    values (bitwise what it was).
    """
    if logits.is_cuda:
        write_rows_without_host_read_(logits, rows, values, changed)
        return
    which = changed.nonzero().squeeze(-1)
    if which.numel() == 0:
        return
    target = which if rows is None else rows.long().index_select(0, which)
    logits.index_copy_(0, target, values.index_select(0, which))


def write_rows_without_host_read_(
    logits: torch.Tensor, rows: torch.Tensor | None, values: torch.Tensor, changed: torch.Tensor
) -> None:
    """`write_rows_` as it runs on CUDA: every selected row written, unchanged ones as they were."""
    target = torch.arange(values.shape[0], device=logits.device) if rows is None else rows.long()
    old = logits.index_select(0, target)
    logits.index_copy_(0, target, torch.where(changed.unsqueeze(-1), values.to(logits.dtype), old))
