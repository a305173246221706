"""Attention mass that each cached key receives from an observation window: SnapKV / H2O scores.

One request's keys live in vLLM's paged cache: token t is in block `block_ids[t // block_size]`,
slot `t % block_size`, of one layer's key view `key` [num_blocks, num_kv_heads, block_size,
head_size] (any strides: the CPU backend's K rows of a [B, H, 2*bs, D] view, or FlashAttention's
`kv[..., :D]` with permuted physical strides). The window's queries `query` [w, num_q_heads,
head_size] (post-RoPE) are the request's last w tokens, at positions length - w .. length - 1.
For each KV head h and position p < length:

    scores[h, p] = sum over window rows i and the q heads g of h's GQA group of
                   softmax_p'(scale * q[i, g] . k[p', h])[p]

with causal masking (row i sees keys p' <= length - w + i) unless `causal=False`. Every row's
softmax sums to 1, so each KV head's scores total w * (num_q_heads // num_kv_heads). This is
SnapKV's observation-window vote before pooling (Li et al. 2024, arXiv:2404.14469) and, with
w = 1 accumulated over decode steps into `out`, H2O's accumulated attention (Zhang et al. 2023,
arXiv:2306.14048). Only the request's blocks and its first `length` slots are read; other
requests' blocks and stale slots may hold anything, NaN included.

`window_attention_mass` runs the Triton kernels on CUDA tensors and
`window_attention_mass_reference` (float32 torch, memory O(w * num_q_heads * length)) on CPU
tensors: vLLM's CPU build disables Triton. The Triton path takes two passes, FlashAttention-style
tiles over the key blocks: pass 1 gives each (window row, q head) its log-sum-exp over the keys
it sees (online softmax); pass 2, one program per (KV head, key tile), sums exp(s - lse) over the
window rows and the head's GQA group and writes (or adds to) its own tile, so no atomics.
"""

from __future__ import annotations

import math
import operator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs may lack Triton
    triton = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2_E = 1.4426950408889634


def check_window_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    block_ids: torch.Tensor,
    length: int,
    scale: float,
    out: torch.Tensor | None,
    what: str,
) -> int:
    """Validate the arguments (see the module docstring); returns `length` as an int.

    Block ids are not range-checked here (that would read the device); the torch path raises
    IndexError on one outside the cache, the kernel would read out of bounds.
    """
    if query.dim() != 3:
        raise ValueError(
            f"{what}: query must be 3-D [window, num_q_heads, head_size], "
            f"got shape {tuple(query.shape)}"
        )
    if key.dim() != 4:
        raise ValueError(
            f"{what}: key must be a 4-D view [num_blocks, num_kv_heads, block_size, head_size], "
            f"got shape {tuple(key.shape)}"
        )
    for name, tensor in (("query", query), ("key", key)):
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{what}: {name} dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]}, "
                f"got {tensor.dtype} (quantised caches need their scales applied first)"
            )
    window, num_q_heads, head_size = query.shape
    _, num_kv_heads, block_size, key_head_size = key.shape
    if head_size != key_head_size or head_size == 0:
        raise ValueError(
            f"{what}: query and key must share a non-zero head_size, got query "
            f"{tuple(query.shape)} and key {tuple(key.shape)}"
        )
    if num_kv_heads == 0 or block_size == 0:
        raise ValueError(
            f"{what}: key needs at least one head and one slot per block, got {tuple(key.shape)}"
        )
    if num_q_heads % num_kv_heads != 0 or num_q_heads == 0:
        raise ValueError(
            f"{what}: num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads}): q head j uses kv head j // (num_q_heads // num_kv_heads)"
        )
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{what}: block_ids must be a 1-D int32/int64 tensor [num_request_blocks], "
            f"got shape {tuple(block_ids.shape)} dtype {block_ids.dtype}"
        )
    for name, tensor in (("key", key), ("block_ids", block_ids)):
        if tensor.device != query.device:
            raise ValueError(
                f"{what}: {name} must be on {query.device} like query, got {tensor.device}"
            )
    if isinstance(length, bool):
        raise ValueError(f"{what}: length must be an int, got {length!r}")
    try:
        length = operator.index(length)
    except TypeError:
        raise ValueError(f"{what}: length must be an int, got {length!r}") from None
    capacity = block_ids.shape[0] * block_size
    if not window <= length <= capacity:
        raise ValueError(
            f"{what}: need window <= length <= len(block_ids) * block_size, got window {window}, "
            f"length {length}, {block_ids.shape[0]} blocks of {block_size} slots ({capacity})"
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what}: scale must be a finite float, got {scale!r}")
    if out is not None:
        expected = (num_kv_heads, length)
        if out.shape != expected or out.dtype != torch.float32 or out.device != query.device:
            raise ValueError(
                f"{what}: out must be float32 {list(expected)} [num_kv_heads, length] on "
                f"{query.device}, got {out.dtype} {list(out.shape)} on {out.device}"
            )
        if (length > 1 and out.stride(1) == 0) or (num_kv_heads > 1 and out.stride(0) == 0):
            raise ValueError(
                f"{what}: out must not be an expanded view (strides {out.stride()}): "
                f"each score is added to its own element"
            )
    return length


def window_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    block_ids: torch.Tensor,
    length: int,
    scale: float,
    out: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Scores float32 [num_kv_heads, length]: Triton on CUDA, float32 torch elsewhere.

    With `out`, the scores are added to it (H2O's accumulation) and `out` is returned.
    """
    check_window_inputs(query, key, block_ids, length, scale, out, "window_attention_mass")
    if query.is_cuda and triton is not None:
        return window_attention_mass_triton(query, key, block_ids, length, scale, out, causal)
    return window_attention_mass_reference(query, key, block_ids, length, scale, out, causal)


def window_attention_mass_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    block_ids: torch.Tensor,
    length: int,
    scale: float,
    out: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Plain float32 torch (the CPU path): gathers the request's keys, one batched softmax."""
    length = check_window_inputs(
        query, key, block_ids, length, scale, out, "window_attention_mass_reference"
    )
    window, num_q_heads, head_size = query.shape
    _, num_kv_heads, block_size, _ = key.shape
    group = num_q_heads // num_kv_heads
    used = -(-length // block_size)
    # [used, H, bs, D] -> [H, length, D]: only the request's blocks, stale slots cut off.
    k = key.index_select(0, block_ids[:used].long()).transpose(0, 1)
    k = k.reshape(num_kv_heads, used * block_size, head_size)[:, :length].float()
    # Rows r = i * group + g_in_group of each kv head, as the kernel numbers them.
    q = query.float().reshape(window, num_kv_heads, group, head_size).transpose(0, 1)
    q = q.reshape(num_kv_heads, window * group, head_size)
    logits = torch.bmm(q, k.transpose(1, 2)).mul_(scale)  # [H, w * group, length]
    if causal:
        position = torch.arange(length - window, length, device=query.device)
        future = torch.arange(length, device=query.device) > position.unsqueeze(-1)
        logits.masked_fill_(future.repeat_interleave(group, dim=0), float("-inf"))
    mass = torch.softmax(logits, dim=-1).sum(dim=1)
    if out is None:
        return mass
    return out.add_(mass)


def window_attention_mass_triton(
    query: torch.Tensor,
    key: torch.Tensor,
    block_ids: torch.Tensor,
    length: int,
    scale: float,
    out: torch.Tensor | None = None,
    causal: bool = True,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Launch the two Triton kernels (any device Triton runs on; CPU under TRITON_INTERPRET=1).

    `block_m` (rows of window x group per tile) and `block_n` (keys per tile) are powers of two
    >= 16 (tl.dot's minimum); None picks them from the shapes.
    """
    if triton is None:
        raise RuntimeError("window_attention_mass_triton needs Triton, which is not installed")
    length = check_window_inputs(
        query, key, block_ids, length, scale, out, "window_attention_mass_triton"
    )
    window, num_q_heads, head_size = query.shape
    _, num_kv_heads, block_size, _ = key.shape
    group = num_q_heads // num_kv_heads
    rows = window * group
    accumulate = out is not None
    if out is None:  # pass 2 writes every element; no query, no mass
        empty = torch.empty if rows else torch.zeros
        out = empty((num_kv_heads, length), dtype=torch.float32, device=query.device)
    if rows == 0:
        return out
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1)):
            raise ValueError(
                f"window_attention_mass_triton: {name} must be a power of two >= 16, got {value}"
            )
    block_d = max(16, triton.next_power_of_2(head_size))
    if block_m is None:
        block_m = max(16, min(64, triton.next_power_of_2(rows)))
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    # fp16 x fp16 and bf16 x bf16 go to the tensor cores as they are (exact products, float32
    # sums); anything with float32 in it is multiplied in IEEE float32, not TF32. Triton's
    # interpreter (CPU tensors) multiplies bf16 operands of tl.dot as their uint16 bit patterns
    # (triton-lang/triton#11584, unsupported there), so it gets them as float32: same values.
    dot_fp32 = (
        query.dtype != key.dtype
        or key.dtype == torch.float32
        or (key.dtype == torch.bfloat16 and not key.is_cuda)
    )
    lse = torch.empty((num_kv_heads, rows), dtype=torch.float32, device=query.device)
    common = dict(
        window=window,
        length=length,
        rows=rows,
        group=group,
        head_size=head_size,
        block_size=block_size,
        qk_scale=float(scale) * LOG2_E,
    )
    strides = (*query.stride(), *key.stride())
    _window_lse_kernel[(num_kv_heads, triton.cdiv(rows, block_m))](
        query,
        key,
        block_ids,
        lse,
        *strides,
        **common,
        CAUSAL=causal,
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    _window_mass_kernel[(num_kv_heads, triton.cdiv(length, block_n))](
        query,
        key,
        block_ids,
        lse,
        out,
        *strides,
        out.stride(0),
        out.stride(1),
        **common,
        CAUSAL=causal,
        ACCUMULATE=accumulate,
        DOT_FP32=dot_fp32,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )
    return out


if triton is not None:

    @triton.jit
    def _load_query_rows(
        query_ptr, head, r0, window, rows, group, head_size,
        stride_qw, stride_qh, stride_qd, length,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Rows r0 .. r0 + BLOCK_M of kv head `head` (r = i * group + g): q [BLOCK_M, BLOCK_D],
        whether each row exists, and the number of keys each row sees."""
        r = r0 + tl.arange(0, BLOCK_M)
        row_ok = r < rows
        i = (r // group).to(tl.int64)
        q_head = head.to(tl.int64) * group + r % group
        dims = tl.arange(0, BLOCK_D)
        q = tl.load(
            query_ptr + i[:, None] * stride_qw + q_head[:, None] * stride_qh
            + dims[None, :].to(tl.int64) * stride_qd,
            mask=row_ok[:, None] & (dims[None, :] < head_size),
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)
        # Every row sees key 0 (padding rows, i >= window and q = 0, see all keys), so no row's
        # logits are all -inf: no inf - inf in the online softmax.
        if CAUSAL:
            visible = (length - window + 1 + i).to(tl.int32)  # row i is at length - window + i
        else:
            visible = tl.zeros((BLOCK_M,), tl.int32) + length
        return q, row_ok, visible

    @triton.jit
    def _load_key_tile(
        key_ptr, block_ids_ptr, head, n0, length, head_size, block_size,
        stride_kb, stride_kh, stride_ks, stride_kd,
        DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Keys n0 .. n0 + BLOCK_N of kv head `head`, transposed: [BLOCK_D, BLOCK_N]. Slots at or
        past `length` are not read (they may be stale or another request's)."""
        t = n0 + tl.arange(0, BLOCK_N)
        t_ok = t < length
        block = tl.load(block_ids_ptr + t // block_size, mask=t_ok, other=0)
        # int64 before multiplying by the block stride: block * stride overflows int32 in big
        # caches.
        slot_off = block.to(tl.int64) * stride_kb + (t % block_size).to(tl.int64) * stride_ks
        dims = tl.arange(0, BLOCK_D)
        kt = tl.load(
            key_ptr + head.to(tl.int64) * stride_kh + slot_off[None, :]
            + dims[:, None].to(tl.int64) * stride_kd,
            mask=t_ok[None, :] & (dims[:, None] < head_size),
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        return kt, t, t_ok

    @triton.jit
    def _scaled_logits(q, kt, qk_scale, DOT_FP32: tl.constexpr):
        """log2-domain logits [BLOCK_M, BLOCK_N] = scale * log2(e) * q . k."""
        if DOT_FP32:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        return s * qk_scale

    @triton.jit
    def _window_lse_kernel(
        query_ptr, key_ptr, block_ids_ptr, lse_ptr,
        stride_qw, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        window, length, rows, group, head_size, block_size, qk_scale,
        CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Pass 1, program (kv head, row tile): lse[head, r] in log2 units over the row's keys.
        head = tl.program_id(0)
        r0 = tl.program_id(1) * BLOCK_M
        q, row_ok, visible = _load_query_rows(
            query_ptr, head, r0, window, rows, group, head_size,
            stride_qw, stride_qh, stride_qd, length,
            CAUSAL, DOT_FP32, BLOCK_M, BLOCK_D,
        )
        if CAUSAL:  # keys past the tile's last row are seen by none of its rows
            last_row = tl.minimum(r0 + BLOCK_M, rows) - 1
            end = length - window + 1 + last_row // group
        else:
            end = length
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_M,), tl.float32)
        for n0 in range(0, end, BLOCK_N):
            kt, t, t_ok = _load_key_tile(
                key_ptr, block_ids_ptr, head, n0, length, head_size, block_size,
                stride_kb, stride_kh, stride_ks, stride_kd,
                DOT_FP32, BLOCK_N, BLOCK_D,
            )
            s = _scaled_logits(q, kt, qk_scale, DOT_FP32)
            s = tl.where(t[None, :] < visible[:, None], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite from the first tile on (key 0)
            total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
            m = m_new
        r = r0 + tl.arange(0, BLOCK_M)
        tl.store(lse_ptr + head.to(tl.int64) * rows + r, m + tl.log2(total), mask=row_ok)

    @triton.jit
    def _window_mass_kernel(
        query_ptr, key_ptr, block_ids_ptr, lse_ptr, out_ptr,
        stride_qw, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_ks, stride_kd,
        stride_oh, stride_op,
        window, length, rows, group, head_size, block_size, qk_scale,
        CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        # Pass 2, program (kv head, key tile): out[head, tile] (+)= sum over rows of
        # exp2(s - lse). The program owns its tile, so it adds without atomics.
        head = tl.program_id(0)
        n0 = tl.program_id(1) * BLOCK_N
        kt, t, t_ok = _load_key_tile(
            key_ptr, block_ids_ptr, head, n0, length, head_size, block_size,
            stride_kb, stride_kh, stride_ks, stride_kd,
            DOT_FP32, BLOCK_N, BLOCK_D,
        )
        if CAUSAL:  # rows before window row n0 - (length - window) see none of the tile
            start = tl.maximum(n0 - (length - window), 0) * group
        else:
            start = 0
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for r0 in range(start, rows, BLOCK_M):
            q, row_ok, visible = _load_query_rows(
                query_ptr, head, r0, window, rows, group, head_size,
                stride_qw, stride_qh, stride_qd, length,
                CAUSAL, DOT_FP32, BLOCK_M, BLOCK_D,
            )
            lse = tl.load(lse_ptr + head.to(tl.int64) * rows + r0 + tl.arange(0, BLOCK_M),
                          mask=row_ok, other=0.0)
            s = _scaled_logits(q, kt, qk_scale, DOT_FP32)
            seen = row_ok[:, None] & t_ok[None, :] & (t[None, :] < visible[:, None])
            s = tl.where(seen, s - lse[:, None], float("-inf"))
            acc += tl.sum(tl.exp2(s), axis=0)
        out_ptrs = out_ptr + head.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_op
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=t_ok, other=0.0)
        tl.store(out_ptrs, acc, mask=t_ok)
