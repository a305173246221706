"""What KV compaction relies on in vLLM's CPU attention kernels on this machine (no engine).

Issue #18 compacts a request's cache inside vLLM's paged blocks: each KV head keeps its own
tokens, moved to the request's first slots, and the attention kernel then reads [0, seq_len) of
the block table as usual. These cases pin, with vLLM's own C++ ops (`cpu_attn_reshape_and_cache`,
`cpu_attention_with_kv_cache`):

- where a token's key and value sit in the CPU backend's per-layer cache
  [num_blocks, num_kv_heads, block_size, 2 * head_size]: each (block, head) holds the keys first,
  *transposed* (element d of the key in slot r at d * block_size + r), then the values row by row
  (at block_size * head_size + r * head_size + d), for the "vec" and "vec16" kernels. The design
  study assumed keys row by row like the values; they are not.
- that attention takes no positions: over a cache compacted per head (different kept tokens per
  KV head, one count per request, GQA) with the new tokens after the kept ones, the kernel's
  output equals a float64 softmax over exactly the kept tokens and the new ones (causal within
  the new ones).

The last cases run the plugin's own pieces on what vLLM wrote: `kv_views(cache, "cpu")` reads
each token's key and value where the kernel put them, and a cache compacted by `compact_kv_`
(each head keeping the tokens `select_tokens` picks from `window_attention_mass` scores) gives
vLLM's attention kernel exactly the kept tokens.

Expected values are computed here from the definitions (plain loops and float64 torch).
`_get_attn_isa` picks "amx" for bfloat16 on CPUs with AMX tiles: its layout is not checked here
(this machine has none), so compaction must not assume it.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm import _custom_ops as ops
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

NUM_BLOCKS, KV_HEADS = 9, 2


@pytest.fixture(scope="module", autouse=True)
def platform_kernels() -> None:
    """What a vLLM worker does at start: load the platform's C++ kernels."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()


def halves(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value caches as the CPU backend passes them to its ops (cpu_attn.py)."""
    num_blocks, heads, block_size, _ = cache.shape
    return cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)


def slot(blocks: list[int], token: int, block_size: int) -> int:
    return blocks[token // block_size] * block_size + token % block_size


def write(cache: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: list[int], isa: str) -> None:
    key_cache, value_cache = halves(cache)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache,
                                   torch.tensor(slots, dtype=torch.int64), isa)


LAYOUTS = [  # (dtype, block_size, head_size, the kernel vLLM picks)
    (torch.float32, 32, 64, "vec"),
    (torch.float32, 16, 64, "vec16"),
    (torch.float16, 32, 48, "vec16"),
    (torch.float16, 128, 64, "vec"),
]


@pytest.mark.parametrize(("dtype", "block_size", "head_size", "isa"), LAYOUTS)
def test_keys_are_stored_transposed_and_values_row_by_row(
    dtype: torch.dtype, block_size: int, head_size: int, isa: str
) -> None:
    assert _get_attn_isa(dtype, block_size, head_size) == isa
    cache = torch.zeros(NUM_BLOCKS, KV_HEADS, block_size, 2 * head_size, dtype=dtype)
    blocks = [6, 2, 4]
    n = 2 * block_size + 3
    # Distinct small integers (exact in float16): token t, head h, element d.
    keys = torch.tensor([[[(t * KV_HEADS + h) * 7 + d % 7 + 1 for d in range(head_size)]
                          for h in range(KV_HEADS)] for t in range(n)], dtype=torch.float32)
    keys = (keys % 2000).to(dtype)
    values = -keys
    write(cache, keys, values, [slot(blocks, t, block_size) for t in range(n)], isa)
    flat = cache.view(NUM_BLOCKS, KV_HEADS, -1)
    for t in (0, 5, block_size, n - 1):
        block, r = blocks[t // block_size], t % block_size
        for h in range(KV_HEADS):
            key_at = [flat[block, h, d * block_size + r].item() for d in range(head_size)]
            value_at = [flat[block, h, block_size * head_size + r * head_size + d].item()
                        for d in range(head_size)]
            assert key_at == keys[t, h].tolist(), (t, h)
            assert value_at == values[t, h].tolist(), (t, h)
    untouched = [b for b in range(NUM_BLOCKS) if b not in blocks]
    assert not flat[untouched].any()


def reference_attention(query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                        scale: float, first_new: int) -> torch.Tensor:
    """query [q, Hq, D]; keys/values per KV head [n_h, D] (kept tokens, then the q new ones);
    new token i sees the kept tokens and new tokens 0..i (float64)."""
    num_queries, q_heads, _ = query.shape
    group = q_heads // len(keys)
    out = torch.empty(num_queries, q_heads, query.shape[2], dtype=torch.float64)
    for i in range(num_queries):
        for g in range(q_heads):
            k, v = keys[g // group].double(), values[g // group].double()
            visible = first_new + i + 1
            p = torch.softmax((k[:visible] @ query[i, g].double()) * scale, dim=0)
            out[i, g] = p @ v[:visible]
    return out


@pytest.mark.parametrize(("dtype", "block_size", "head_size", "isa"), LAYOUTS[:2])
@pytest.mark.parametrize("num_queries", [1, 3])
def test_attention_over_a_cache_compacted_per_head_equals_the_kept_tokens_attention(
    dtype: torch.dtype, block_size: int, head_size: int, isa: str, num_queries: int
) -> None:
    torch.manual_seed(block_size + num_queries)
    q_heads, blocks, n, budget = 4, [7, 1, 3, 5], 3 * block_size + 5, block_size + 4
    keys = torch.randn(n, KV_HEADS, head_size).to(dtype)
    values = torch.randn(n, KV_HEADS, head_size).to(dtype)
    cache = torch.full((NUM_BLOCKS, KV_HEADS, block_size, 2 * head_size), float("nan"), dtype=dtype)
    write(cache, keys, values, [slot(blocks, t, block_size) for t in range(n)], isa)
    # Each head keeps its own `budget` tokens, moved to slots 0..budget-1 (a plain per-token copy
    # through the layout pinned above), and the new tokens follow at slots budget, budget + 1, ...
    keep = [sorted(torch.randperm(n)[:budget].tolist()) for _ in range(KV_HEADS)]
    flat = cache.view(NUM_BLOCKS, KV_HEADS, -1)
    kept_keys = [keys[keep[h], h] for h in range(KV_HEADS)]
    kept_values = [values[keep[h], h] for h in range(KV_HEADS)]
    for h in range(KV_HEADS):
        for i in range(budget):
            block, r = blocks[i // block_size], i % block_size
            flat[block, h, r : block_size * head_size : block_size] = kept_keys[h][i]
            start = block_size * head_size + r * head_size
            flat[block, h, start : start + head_size] = kept_values[h][i]
    new_keys = torch.randn(num_queries, KV_HEADS, head_size).to(dtype)
    new_values = torch.randn(num_queries, KV_HEADS, head_size).to(dtype)
    write(cache, new_keys, new_values, [slot(blocks, budget + i, block_size) for i in range(num_queries)], isa)
    query = torch.randn(num_queries, q_heads, head_size).to(dtype)
    seq_lens = torch.tensor([budget + num_queries], dtype=torch.int32)
    query_start = torch.tensor([0, num_queries], dtype=torch.int32)
    scale = 1.0 / math.sqrt(head_size)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=q_heads, num_kv_heads=KV_HEADS, head_dim=head_size, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=query_start, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    key_cache, value_cache = halves(cache)
    output = torch.empty(num_queries, q_heads, head_size, dtype=dtype)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=torch.tensor([blocks], dtype=torch.int32), softcap=0.0,
        scheduler_metadata=metadata, s_aux=None)
    expected = reference_attention(
        query, [torch.cat([kept_keys[h], new_keys[:, h]]) for h in range(KV_HEADS)],
        [torch.cat([kept_values[h], new_values[:, h]]) for h in range(KV_HEADS)], scale, budget)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(output.double(), expected, atol=tolerance, rtol=tolerance), \
        (output.double() - expected).abs().max()


@pytest.mark.parametrize(("dtype", "block_size", "head_size", "isa"), LAYOUTS)
def test_the_plugins_cpu_views_read_what_vllm_wrote(
    dtype: torch.dtype, block_size: int, head_size: int, isa: str
) -> None:
    from vllm_adaptive.kernels.kv_compact import kv_views

    torch.manual_seed(3)
    cache = torch.zeros(NUM_BLOCKS, KV_HEADS, block_size, 2 * head_size, dtype=dtype)
    blocks, n = [3, 8], block_size + 7
    keys = torch.randn(n, KV_HEADS, head_size).to(dtype)
    values = torch.randn(n, KV_HEADS, head_size).to(dtype)
    write(cache, keys, values, [slot(blocks, t, block_size) for t in range(n)], isa)
    key, value = kv_views(cache, "cpu")
    for t in range(n):
        block, r = blocks[t // block_size], t % block_size
        assert torch.equal(key[block, :, r], keys[t]) and torch.equal(value[block, :, r], values[t]), t


@pytest.mark.parametrize(("dtype", "block_size", "head_size", "isa"), LAYOUTS[:2])
def test_attention_after_the_plugins_compaction_sees_exactly_the_kept_tokens(
    dtype: torch.dtype, block_size: int, head_size: int, isa: str
) -> None:
    from vllm_adaptive.kernels.kv_compact import compact_kv_, kv_views
    from vllm_adaptive.kernels.kv_score import window_attention_mass
    from vllm_adaptive.kvcache.selection import pool_scores, select_tokens

    torch.manual_seed(11)
    q_heads, blocks, n, window = 4, [2, 6, 0, 4], 3 * block_size + 9, 8
    keys = torch.randn(n, KV_HEADS, head_size).to(dtype)
    values = torch.randn(n, KV_HEADS, head_size).to(dtype)
    cache = torch.full((NUM_BLOCKS, KV_HEADS, block_size, 2 * head_size), float("nan"), dtype=dtype)
    write(cache, keys, values, [slot(blocks, t, block_size) for t in range(n)], isa)
    key, value = kv_views(cache, "cpu")
    block_ids = torch.tensor(blocks, dtype=torch.int32)
    scale = 1.0 / math.sqrt(head_size)
    mass = window_attention_mass(torch.randn(window, q_heads, head_size).to(dtype), key, block_ids, n, scale)
    budget = block_size + 3
    keep = select_tokens(pool_scores(mass, 5), n, budget, sinks=2, recent=4)
    assert not torch.equal(keep[0], keep[1])  # the heads keep different tokens
    compact_kv_(key, value, block_ids, keep)
    new_key, new_value = torch.randn(1, KV_HEADS, head_size).to(dtype), torch.randn(1, KV_HEADS, head_size).to(dtype)
    write(cache, new_key, new_value, [slot(blocks, budget, block_size)], isa)
    query = torch.randn(1, q_heads, head_size).to(dtype)
    seq_lens, query_start = torch.tensor([budget + 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32)
    metadata = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=q_heads, num_kv_heads=KV_HEADS, head_dim=head_size, seq_lens=seq_lens,
        dtype=dtype, query_start_loc=query_start, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=False)
    key_cache, value_cache = halves(cache)
    output = torch.empty(1, q_heads, head_size, dtype=dtype)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=output,
        query_start_loc=query_start, seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None,
        sliding_window=-1, block_table=block_ids.unsqueeze(0), softcap=0.0,
        scheduler_metadata=metadata, s_aux=None)
    kept = keep.tolist()
    expected = reference_attention(
        query, [torch.cat([keys[kept[h], h], new_key[:, h]]) for h in range(KV_HEADS)],
        [torch.cat([values[kept[h], h], new_value[:, h]]) for h in range(KV_HEADS)], scale, budget)
    assert torch.allclose(output.double(), expected, atol=1e-5, rtol=1e-5), (output.double() - expected).abs().max()
