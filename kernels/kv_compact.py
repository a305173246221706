"""Compact one request's paged KV cache in place: per KV head, move the kept tokens to the front.

One request's cache lives in `block_ids` (its block table row: scattered ids into the layer's
cache); token t sits in block `block_ids[t // block_size]`, slot `t % block_size`. Compaction
keeps, per KV head h, the `count` tokens `keep[h, :count]` (strictly ascending physical indices)
and moves them to token positions 0..count-1 of the same blocks, for K and V, leaving every other
slot unwritten. Heads may keep different tokens; attention needs no change because heads are
independent and softmax is permutation-invariant over [0, seq_len) (the attention kernels take
no positions: tests/contract/kv_compaction_probe_cases.py).

All vLLM 0.32 backends store a layer as a logical [num_blocks, num_kv_heads, block_size,
2 * head_size] tensor; `kv_views` turns it into K and V views [num_blocks, H, block_size, D] for
the CPU backend (per block and head: the keys transposed, then the values) and for
FlashAttention / Triton (the two halves of the last dim, any stride permutation). The ops take
those views with any strides.

`compact_kv_` runs the Triton kernel on CUDA tensors and `compact_kv_reference_` (plain torch)
elsewhere: vLLM's CPU build disables Triton.

Overlap: destination slot i may be the source of a later kept token (keep[h, i] >= i), so an
in-place copy must never overwrite a slot before it has been read. The Triton path gathers the
kept rows into a temporary and scatters them from there in separate launches, so its correctness
rests on stream order alone, not on the order of programs or on barriers inside one (which
Triton's interpreter, where the tests run, cannot show). To bound the temporary on long
requests it goes in rounds over destination positions in ascending order: round [s, s + n) reads
sources keep[h, s:s + n] >= s, and earlier rounds wrote only positions < s.
"""

from __future__ import annotations

from typing import Literal

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs may lack Triton
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
KVLayout = Literal["cpu", "flash"]
# Elements of the Triton path's temporary per round (8 MiB in float16); sets the default round.
TEMP_ELEMENTS = 1 << 22


def kv_views(kv_cache: torch.Tensor, layout: KVLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value) views [num_blocks, H, block_size, D] of a layer's cache, sharing its storage.

    `kv_cache` is the logical [num_blocks, H, block_size, 2 * D] tensor vLLM 0.32 allocates per
    layer. "cpu": the CPU backend's kernels ("vec", "vec16") store each (block, head) as its keys
    *transposed* ([D, block_size]: element d of slot r at d * block_size + r), then its values
    row by row ([block_size, D]) (pinned by tests/contract/kv_compaction_probe_cases.py); the key
    view is that transposed half seen as [block_size, D] (strides (.., .., 1, block_size)). It
    needs the CPU backend's contiguous last two dims. The "amx" kernel (bfloat16 on CPUs with AMX
    tiles) packs differently and is not covered. "flash" (FlashAttention, Triton):
    K = kv_cache[..., :D], V = kv_cache[..., D:], any strides.
    """
    if kv_cache.dim() != 4 or kv_cache.shape[-1] % 2:
        raise ValueError(
            "kv_views: kv_cache must be 4-D [num_blocks, num_kv_heads, block_size, 2 * head_size], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    num_blocks, heads, block_size, two_d = kv_cache.shape
    head_size = two_d // 2
    if layout == "flash":
        return kv_cache[..., :head_size], kv_cache[..., head_size:]
    if layout == "cpu":
        try:
            runs = kv_cache.view(num_blocks, heads, 2 * block_size * head_size)
        except RuntimeError as e:
            raise ValueError(
                "kv_views: the cpu layout views each (block, head) as one run of "
                "2 * block_size * head_size elements, which needs contiguous slot and feature dims; "
                f"got strides {kv_cache.stride()} for shape {tuple(kv_cache.shape)}"
            ) from e
        half = block_size * head_size
        key = runs[..., :half].unflatten(-1, (head_size, block_size)).transpose(2, 3)
        value = runs[..., half:].unflatten(-1, (block_size, head_size))
        return key, value
    raise ValueError(f"kv_views: layout must be 'cpu' or 'flash', got {layout!r}")


def check_compaction(
    key: torch.Tensor,
    value: torch.Tensor,
    block_ids: torch.Tensor,
    keep: torch.Tensor,
    what: str,
    check_indices: bool,
) -> None:
    """Validate the arguments of a compaction. With `check_indices`, also the index values: one
    read back to the host (a device sync on CUDA)."""
    if key.dim() != 4:
        raise ValueError(
            f"{what}: key must be a 4-D view [num_blocks, num_kv_heads, block_size, head_size] "
            f"(see kv_views), got shape {tuple(key.shape)}"
        )
    if value.shape != key.shape:
        raise ValueError(
            f"{what}: value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}"
        )
    if key.dtype not in SUPPORTED_DTYPES or value.dtype != key.dtype:
        raise ValueError(
            f"{what}: key and value must share one dtype of {[str(d) for d in SUPPORTED_DTYPES]}, "
            f"got {key.dtype} and {value.dtype}"
        )
    if key.numel() and key.data_ptr() == value.data_ptr():
        raise ValueError(
            f"{what}: key and value are the same memory; pass the two views kv_views returns"
        )
    num_blocks, heads, block_size, _ = key.shape
    if block_ids.dim() != 1 or block_ids.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"{what}: block_ids must be a 1-D int32/int64 tensor [num_request_blocks], "
            f"got shape {tuple(block_ids.shape)} dtype {block_ids.dtype}"
        )
    if keep.dim() != 2 or keep.shape[0] != heads or keep.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"{what}: keep must be an int32/int64 tensor [num_kv_heads={heads}, count], "
            f"got shape {tuple(keep.shape)} dtype {keep.dtype}"
        )
    for name, t in (("value", value), ("block_ids", block_ids), ("keep", keep)):
        if t.device != key.device:
            raise ValueError(f"{what}: {name} must be on {key.device} like key, got {t.device}")
    count = keep.shape[1]
    capacity = block_ids.shape[0] * block_size
    if count > capacity:
        raise ValueError(
            f"{what}: count {count} exceeds the request's {block_ids.shape[0]} blocks "
            f"of {block_size} slots ({capacity})"
        )
    if not check_indices:
        return
    ids, kept = block_ids.long(), keep.long()
    no = torch.zeros((), dtype=torch.bool, device=ids.device)
    sorted_ids = ids.sort().values
    flags = [
        (ids.amin() < 0) | (ids.amax() >= num_blocks) if ids.numel() else no,
        (sorted_ids.diff() == 0).any() if ids.numel() else no,
        (kept[:, 0].amin() < 0) | (kept[:, -1].amax() >= capacity) if kept.numel() else no,
        (kept.diff(dim=1) <= 0).any() if kept.numel() else no,
    ]
    bad = torch.stack(flags).tolist()  # the one host read
    if bad[0]:
        raise ValueError(
            f"{what}: block_ids must lie in [0, {num_blocks}) (the cache's blocks), "
            f"got values from {ids.amin().item()} to {ids.amax().item()}"
        )
    if bad[1]:
        raise ValueError(f"{what}: block_ids must not repeat a block, got {ids.tolist()}")
    if bad[2]:
        raise ValueError(
            f"{what}: keep must index the request's tokens [0, {capacity}) "
            f"({block_ids.shape[0]} blocks of {block_size}), got values from "
            f"{kept.amin().item()} to {kept.amax().item()}"
        )
    if bad[3]:
        head = int((kept.diff(dim=1) <= 0).any(dim=1).nonzero()[0])
        raise ValueError(
            f"{what}: keep must be strictly ascending per head; head {head} is "
            f"{kept[head].tolist()}"
        )


def compact_kv_(
    key: torch.Tensor,
    value: torch.Tensor,
    block_ids: torch.Tensor,
    keep: torch.Tensor,
    *,
    check_indices: bool = True,
) -> None:
    """Move, per head h, tokens keep[h, :] of the request in `block_ids` to positions
    0..count-1, in K and V, in place: Triton on CUDA, the torch reference elsewhere.

    key, value: [num_blocks, H, block_size, D] views (kv_views), float32/float16/bfloat16, any
    strides. block_ids: int32/int64 [num_request_blocks], distinct. keep: int32/int64 [H, count],
    strictly ascending per head, < num_request_blocks * block_size. `check_indices=False` skips
    the checks of the index values (their host read is a device sync).
    """
    check_compaction(key, value, block_ids, keep, "compact_kv_", check_indices)
    if key.is_cuda and triton is not None:
        compact_kv_triton_(key, value, block_ids, keep, check_indices=False)
    else:
        compact_kv_reference_(key, value, block_ids, keep, check_indices=False)


def compact_kv_reference_(
    key: torch.Tensor,
    value: torch.Tensor,
    block_ids: torch.Tensor,
    keep: torch.Tensor,
    *,
    check_indices: bool = True,
) -> None:
    """Plain torch (the CPU path): gather every kept row into a temporary, then scatter it."""
    check_compaction(key, value, block_ids, keep, "compact_kv_reference_", check_indices)
    heads, count = keep.shape
    if count == 0:
        return
    block_size = key.shape[2]
    ids = block_ids.long()
    src = keep.long()
    dst = torch.arange(count, device=key.device)
    head = torch.arange(heads, device=key.device).unsqueeze(1)
    src_block, src_slot = ids[src // block_size], src % block_size  # [H, count]
    dst_block, dst_slot = ids[dst // block_size], dst % block_size  # [count]
    for cache in (key, value):
        rows = cache[src_block, head, src_slot]  # [H, count, D], a copy: overlap-safe
        cache[dst_block, head, dst_slot] = rows


def compact_kv_triton_(
    key: torch.Tensor,
    value: torch.Tensor,
    block_ids: torch.Tensor,
    keep: torch.Tensor,
    *,
    check_indices: bool = True,
    round_tokens: int | None = None,
) -> None:
    """Launch the Triton kernels (any device Triton runs on; CPU under TRITON_INTERPRET=1).

    Each gather/scatter round moves `round_tokens` destination positions (default: as many as
    keep the temporary [H, round_tokens, D] within TEMP_ELEMENTS elements).
    """
    if triton is None:
        raise RuntimeError("compact_kv_triton_ needs Triton, which is not installed")
    check_compaction(key, value, block_ids, keep, "compact_kv_triton_", check_indices)
    if round_tokens is not None and round_tokens < 1:
        raise ValueError(f"compact_kv_triton_: round_tokens must be >= 1, got {round_tokens}")
    heads, count = keep.shape
    block_size, head_size = key.shape[2], key.shape[3]
    if count == 0 or heads == 0 or head_size == 0:
        return
    block_d = triton.next_power_of_2(head_size)
    block_t = max(1, min(64, 4096 // block_d))
    if round_tokens is None:
        round_tokens = max(block_t, TEMP_ELEMENTS // (heads * head_size))
    round_tokens = min(round_tokens, count)
    temp = torch.empty((heads, round_tokens, head_size), dtype=key.dtype, device=key.device)
    for start in range(0, count, round_tokens):
        n = min(round_tokens, count - start)
        grid = (triton.cdiv(n, block_t), heads)
        for cache in (key, value):
            for gather in (True, False):  # the scatter launch follows its gather on the stream
                _move_kept_rows_kernel[grid](
                    cache,
                    temp,
                    block_ids,
                    keep,
                    start,
                    n,
                    block_size,
                    head_size,
                    *cache.stride(),
                    temp.stride(0),
                    temp.stride(1),
                    block_ids.stride(0),
                    *keep.stride(),
                    GATHER=gather,
                    BLOCK_T=block_t,
                    BLOCK_D=block_d,
                )


if triton is not None:

    @triton.jit
    def _move_kept_rows_kernel(
        cache_ptr,
        temp_ptr,
        block_ids_ptr,
        keep_ptr,
        start,
        n,
        block_size,
        head_size,
        stride_block,
        stride_head,
        stride_slot,
        stride_dim,
        temp_stride_head,
        temp_stride_row,
        block_ids_stride,
        keep_stride_head,
        keep_stride_row,
        GATHER: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # GATHER: temp[h, i] = cache row of token keep[h, start + i]; else cache row of token
        # start + i = temp[h, i]. Program (token tile, head); rows i < n.
        head = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        in_round = rows < n
        dims = tl.arange(0, BLOCK_D).to(tl.int64)
        mask = in_round[:, None] & (dims < head_size)[None, :]
        if GATHER:
            keep_ptrs = keep_ptr + head * keep_stride_head + (start + rows) * keep_stride_row
            token = tl.load(keep_ptrs, mask=in_round, other=0).to(tl.int64)
        else:
            token = start + rows
        block_index = token // block_size
        # int64 before multiplying by the stride: block id * block stride overflows int32 on
        # large caches, and vLLM's block tables are int32.
        block = tl.load(
            block_ids_ptr + block_index * block_ids_stride, mask=in_round, other=0
        ).to(tl.int64)
        slot = token - block_index * block_size
        cache_rows = block * stride_block + head * stride_head + slot * stride_slot
        cache_ptrs = cache_ptr + cache_rows[:, None] + dims[None, :] * stride_dim
        temp_rows = head * temp_stride_head + rows * temp_stride_row
        temp_ptrs = temp_ptr + temp_rows[:, None] + dims[None, :]
        if GATHER:
            tl.store(temp_ptrs, tl.load(cache_ptrs, mask=mask), mask=mask)
        else:
            tl.store(cache_ptrs, tl.load(temp_ptrs, mask=mask), mask=mask)
