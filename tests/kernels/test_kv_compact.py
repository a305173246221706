"""The KV compaction kernel (run by the interpreter on CPU) against its torch reference and a
per-token Python loop.

The op works in place, so every comparison is bitwise over the whole cache: the expected cache is
the input with only the destination slots rewritten by `naive_compact_`, which moves one token at
a time from a copy of the kept rows. Tokens a head does not keep and the slots past the request's
length hold NaN, so a destination the op forgets to write, or fills from a dropped token, shows
up as NaN.
"""

from __future__ import annotations

import pytest
import torch
from kernel_compare import assert_bitwise_equal

from vllm_adaptive.kernels import kv_compact as module
from vllm_adaptive.kernels.kv_compact import (
    compact_kv_,
    compact_kv_reference_,
    compact_kv_triton_,
    kv_views,
)

NAN = float("nan")
# A block table in no particular order, with other requests' blocks between its blocks.
REQUEST_BLOCKS = [9, 2, 14, 5, 11]
NUM_BLOCKS = 16


def new_cache(
    layout: str, num_blocks: int, heads: int, block_size: int, head_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """A logical [num_blocks, H, block_size, 2 * D] cache of random values. "flash_nhd" stores it
    physically as [num_blocks, block_size, H, 2 * D] (vLLM's NHD order), "flash_reversed" as
    [2 * D, block_size, H, num_blocks] (features strided, blocks contiguous); the returned view
    permutes it back."""
    g = torch.Generator().manual_seed(num_blocks * 1000 + heads * 100 + head_size)
    if layout == "flash_nhd":
        physical = torch.randn(num_blocks, block_size, heads, 2 * head_size, generator=g)
        return physical.to(dtype).permute(0, 2, 1, 3)
    if layout == "flash_reversed":
        physical = torch.randn(2 * head_size, block_size, heads, num_blocks, generator=g)
        return physical.to(dtype).permute(3, 2, 1, 0)
    return torch.randn(num_blocks, heads, block_size, 2 * head_size, generator=g).to(dtype)


def views(kv_cache: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    return kv_views(kv_cache, "cpu" if layout == "cpu" else "flash")


def slot(block_ids: list[int], block_size: int, token: int) -> tuple[int, int]:
    """(block id, slot) of a request's token."""
    return block_ids[token // block_size], token % block_size


def poison_dropped_tokens_(
    kv_cache: torch.Tensor, layout: str, block_ids: list[int], length: int, keep: torch.Tensor
) -> None:
    """NaN in K and V wherever the request holds nothing that must survive: tokens a head does
    not keep, and slots at or past `length` in its blocks."""
    key, value = views(kv_cache, layout)
    block_size = key.shape[2]
    for h, kept in enumerate(keep.tolist()):
        for t in sorted(set(range(len(block_ids) * block_size)) - set(kept)):
            b, s = slot(block_ids, block_size, t)
            key[b, h, s] = NAN
            value[b, h, s] = NAN


def naive_compact_(
    key: torch.Tensor, value: torch.Tensor, block_ids: list[int], keep: torch.Tensor
) -> None:
    """The definition, one token at a time: copy out head h's kept rows, then write the i-th of
    them to token i."""
    block_size = key.shape[2]
    for cache in (key, value):
        for h, kept in enumerate(keep.tolist()):
            rows = []
            for t in kept:
                b, s = slot(block_ids, block_size, t)
                rows.append(cache[b, h, s].clone())
            for i, row in enumerate(rows):
                b, s = slot(block_ids, block_size, i)
                cache[b, h, s] = row


def random_keep(heads: int, length: int, count: int, seed: int) -> torch.Tensor:
    """A different ascending subset of [0, length) of size `count` per head."""
    g = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(length, generator=g)[:count].sort().values for _ in range(heads)]
    return torch.stack(subsets)


def compact_three_ways(
    kv_cache: torch.Tensor, layout: str, block_ids: torch.Tensor, keep: torch.Tensor, **kw: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kernel, reference, per-token loop) results, each on its own copy of the cache (a clone
    keeps a permuted cache's physical order)."""
    kernel, reference, naive = kv_cache.clone(), kv_cache.clone(), kv_cache.clone()
    compact_kv_triton_(*views(kernel, layout), block_ids, keep, **kw)
    compact_kv_reference_(*views(reference, layout), block_ids, keep)
    naive_compact_(*views(naive, layout), block_ids.tolist(), keep)
    return kernel, reference, naive


def assert_all_match(
    kernel: torch.Tensor, reference: torch.Tensor, naive: torch.Tensor, what: str
) -> None:
    assert_bitwise_equal(kernel, naive, f"kernel vs per-token loop, {what}")
    assert_bitwise_equal(reference, naive, f"reference vs per-token loop, {what}")


def test_kernel_runs_in_the_interpreter() -> None:
    assert type(module._move_kept_rows_kernel).__name__ == "InterpretedFunction"


# Every layout with every dtype, each with another head count (GQA-like 1, 2, 8), head size
# (not a power of two) and block size.
CASES = [
    ("cpu", torch.float32, 1, 40, 16),
    ("cpu", torch.float16, 8, 72, 32),
    ("cpu", torch.bfloat16, 2, 40, 32),
    ("flash", torch.float32, 2, 72, 16),
    ("flash", torch.float16, 1, 40, 32),
    ("flash", torch.bfloat16, 8, 40, 16),
    ("flash_nhd", torch.float32, 8, 40, 32),
    ("flash_nhd", torch.float16, 2, 40, 16),
    ("flash_nhd", torch.bfloat16, 1, 72, 16),
    ("flash_reversed", torch.float16, 2, 40, 16),
]


@pytest.mark.parametrize(("layout", "dtype", "heads", "head_size", "block_size"), CASES)
def test_per_head_selection_matches_per_token_loop(
    layout: str, dtype: torch.dtype, heads: int, head_size: int, block_size: int
) -> None:
    length = 4 * block_size + 3  # the request's last block is partly filled
    count = length // 2 + 1
    keep = random_keep(heads, length, count, seed=heads + head_size)
    kv_cache = new_cache(layout, NUM_BLOCKS, heads, block_size, head_size, dtype)
    poison_dropped_tokens_(kv_cache, layout, REQUEST_BLOCKS, length, keep)
    block_ids = torch.tensor(REQUEST_BLOCKS, dtype=torch.int32)
    kernel, reference, naive = compact_three_ways(kv_cache, layout, block_ids, keep)
    assert_all_match(kernel, reference, naive, f"{layout} {dtype} H={heads} D={head_size}")

    # Spelled out: the kept rows arrived; slots from `count` on and other blocks are untouched.
    key, value = views(kernel, layout)
    old_key, old_value = views(kv_cache, layout)
    for h in range(heads):
        for i in (0, count - 1):
            b, s = slot(REQUEST_BLOCKS, block_size, i)
            ob, os_ = slot(REQUEST_BLOCKS, block_size, int(keep[h, i]))
            assert_bitwise_equal(key[b, h, s], old_key[ob, h, os_], f"K head {h} token {i}")
            assert_bitwise_equal(value[b, h, s], old_value[ob, h, os_], f"V head {h} token {i}")
    for i in range(count, len(REQUEST_BLOCKS) * block_size):
        b, s = slot(REQUEST_BLOCKS, block_size, i)
        assert_bitwise_equal(key[b, :, s], old_key[b, :, s], f"K slot of token {i} >= count")
        assert_bitwise_equal(value[b, :, s], old_value[b, :, s], f"V slot of token {i} >= count")
    others = [b for b in range(NUM_BLOCKS) if b not in REQUEST_BLOCKS]
    assert_bitwise_equal(kernel[others], kv_cache[others], "other requests' blocks")


@pytest.mark.parametrize("layout", ["cpu", "flash_nhd"])
def test_keeping_every_token_changes_nothing(layout: str) -> None:
    length = 2 * 16 + 5
    kv_cache = new_cache(layout, NUM_BLOCKS, 2, 16, 40, torch.float16)
    keep = torch.arange(length).expand(2, length)  # head stride 0: strided indices too
    for op in (compact_kv_triton_, compact_kv_reference_):
        cache = kv_cache.clone()
        op(*views(cache, layout), torch.tensor(REQUEST_BLOCKS), keep)
        assert_bitwise_equal(cache, kv_cache, f"{op.__name__} identity")


def test_keeping_nothing_writes_nothing() -> None:
    kv_cache = new_cache("flash", NUM_BLOCKS, 2, 16, 40, torch.float32)
    keep = torch.empty(2, 0, dtype=torch.long)
    kernel, reference, _ = compact_three_ways(kv_cache, "flash", torch.tensor(REQUEST_BLOCKS), keep)
    assert_bitwise_equal(kernel, kv_cache, "kernel, count 0")
    assert_bitwise_equal(reference, kv_cache, "reference, count 0")


def test_one_kept_token_per_head_lands_in_slot_zero() -> None:
    # Head 0 keeps token 68 (block 11, slot 4), head 1 token 20 (block 2, slot 4); token 0 is
    # block 9, slot 0.
    kv_cache = new_cache("cpu", NUM_BLOCKS, 2, 16, 40, torch.bfloat16)
    keep = torch.tensor([[68], [20]])
    block_ids = torch.tensor(REQUEST_BLOCKS)
    kernel, reference, naive = compact_three_ways(kv_cache, "cpu", block_ids, keep)
    assert_all_match(kernel, reference, naive, "count 1")
    key, value = views(kernel, "cpu")
    old_key, old_value = views(kv_cache, "cpu")
    assert_bitwise_equal(key[9, 0, 0], old_key[11, 0, 4], "K head 0")
    assert_bitwise_equal(value[9, 1, 0], old_value[2, 1, 4], "V head 1")


@pytest.mark.parametrize("round_tokens", [1, 7, None])
def test_maximal_overlap_shifts_every_token_down_by_one(round_tokens: int | None) -> None:
    # keep = [1, ..., P-1]: every destination is the source of the next token, so a slot
    # written before it is read shows up. Rounds of 1 and 7 tokens, and a single round.
    length = 3 * 16 + 9
    heads = 2
    keep = torch.arange(1, length).expand(heads, length - 1)
    kv_cache = new_cache("flash_nhd", NUM_BLOCKS, heads, 16, 72, torch.float32)
    poison_dropped_tokens_(kv_cache, "flash_nhd", REQUEST_BLOCKS, length, keep)
    kw = {} if round_tokens is None else {"round_tokens": round_tokens}
    block_ids = torch.tensor(REQUEST_BLOCKS)
    kernel, reference, naive = compact_three_ways(kv_cache, "flash_nhd", block_ids, keep, **kw)
    assert_all_match(kernel, reference, naive, f"keep 1..P-1, rounds of {round_tokens}")
    key, old_key = views(kernel, "flash")[0], views(kv_cache, "flash")[0]
    for i in range(length - 1):
        b, s = slot(REQUEST_BLOCKS, 16, i)
        nb, ns = slot(REQUEST_BLOCKS, 16, i + 1)
        assert_bitwise_equal(key[b, :, s], old_key[nb, :, ns], f"token {i} holds old {i + 1}")


@pytest.mark.parametrize("round_tokens", [5, 16])
def test_rounds_match_per_token_loop_with_different_heads(round_tokens: int) -> None:
    length = 4 * 16 + 3
    keep = random_keep(8, length, 40, seed=7)
    kv_cache = new_cache("cpu", NUM_BLOCKS, 8, 16, 40, torch.float16)
    poison_dropped_tokens_(kv_cache, "cpu", REQUEST_BLOCKS, length, keep)
    block_ids = torch.tensor(REQUEST_BLOCKS)
    kernel, reference, naive = compact_three_ways(
        kv_cache, "cpu", block_ids, keep, round_tokens=round_tokens
    )
    assert_all_match(kernel, reference, naive, f"rounds of {round_tokens}")


@pytest.mark.parametrize(
    ("ids_dtype", "keep_dtype"), [(torch.int32, torch.int64), (torch.int64, torch.int32)]
)
def test_index_dtypes(ids_dtype: torch.dtype, keep_dtype: torch.dtype) -> None:
    length = 2 * 16 + 1
    keep = random_keep(2, length, 12, seed=3)
    kv_cache = new_cache("flash", NUM_BLOCKS, 2, 16, 40, torch.float32)
    poison_dropped_tokens_(kv_cache, "flash", REQUEST_BLOCKS, length, keep)
    block_ids = torch.tensor(REQUEST_BLOCKS, dtype=ids_dtype)
    kernel, reference, naive = compact_three_ways(kv_cache, "flash", block_ids, keep.to(keep_dtype))
    assert_all_match(kernel, reference, naive, f"block_ids {ids_dtype}, keep {keep_dtype}")


def test_block_offsets_beyond_int32() -> None:
    # Blocks of 2 * 16 * 80 = 2560 elements; ids above 2**32 / 2560 put the request's rows more
    # than 2**32 elements in, where int32 block id * block stride wraps to a small positive
    # offset: into blocks 0..15, which hold NaN and are checked below. Triton's interpreter
    # works on a CPU tensor's own storage (no copy), and torch.empty's pages are only
    # committed where written, so this 8.6 GB cache costs a few hundred KiB of memory.
    heads, block_size, head_size = 2, 16, 40
    block_ids = [1677733, 1677722, 1677729]
    length, count = 3 * block_size, 30
    keep = random_keep(heads, length, count, seed=11)
    small = new_cache("flash", 3, heads, block_size, head_size, torch.float16)
    poison_dropped_tokens_(small, "flash", [0, 1, 2], length, keep)
    expected = small.clone()
    naive_compact_(*views(expected, "flash"), [0, 1, 2], keep)

    cache = torch.empty(
        max(block_ids) + 3, heads, block_size, 2 * head_size, dtype=torch.float16
    )
    assert cache.stride(0) * min(block_ids) > 2**32
    for op in (compact_kv_triton_, compact_kv_reference_):
        cache[:16] = NAN
        cache[block_ids] = small
        op(*views(cache, "flash"), torch.tensor(block_ids, dtype=torch.int32), keep)
        assert_bitwise_equal(cache[block_ids], expected, f"{op.__name__}: the request's blocks")
        assert torch.isnan(cache[:16]).all(), f"{op.__name__} wrote where int32 offsets wrap to"


def test_cpu_tensors_take_the_reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_triton(*args: object, **kw: object) -> None:
        pytest.fail("compact_kv_ ran the Triton kernel on CPU tensors")

    calls = []
    reference = module.compact_kv_reference_

    def spy(*args: torch.Tensor, **kw: bool) -> None:
        calls.append(kw)
        reference(*args, **kw)

    monkeypatch.setattr(module, "compact_kv_triton_", no_triton)
    monkeypatch.setattr(module, "compact_kv_reference_", spy)
    keep = random_keep(2, 2 * 16 + 1, 10, seed=5)
    kv_cache = new_cache("cpu", NUM_BLOCKS, 2, 16, 40, torch.float32)
    got, expected = kv_cache.clone(), kv_cache.clone()
    compact_kv_(*views(got, "cpu"), torch.tensor(REQUEST_BLOCKS), keep)
    naive_compact_(*views(expected, "cpu"), REQUEST_BLOCKS, keep)
    assert calls == [{"check_indices": False}]  # checked once, by compact_kv_
    assert_bitwise_equal(got, expected)


def test_cpu_views_are_the_transposed_keys_then_the_values_of_each_block_head() -> None:
    # vLLM's CPU kernels (tests/contract/kv_compaction_probe_cases.py): per (block, head), the
    # keys as [D, bs] (element d of slot r at d * bs + r), then the values as [bs, D].
    bs, d = 4, 3
    kv_cache = torch.arange(3 * 2 * bs * 2 * d, dtype=torch.float32).view(3, 2, bs, 2 * d)
    key, value = kv_views(kv_cache, "cpu")
    assert key.shape == value.shape == (3, 2, bs, d)
    flat = kv_cache.reshape(3, 2, 2 * bs * d)  # each (block, head) as one run
    for b, h, r, e in ((0, 0, 0, 0), (1, 1, 2, 1), (2, 0, 3, 2)):
        assert key[b, h, r, e] == flat[b, h, e * bs + r]
        assert value[b, h, r, e] == flat[b, h, bs * d + r * d + e]
    key[1, 1, 2, 0] = -1.0
    assert flat[1, 1, 2] == -1.0  # a view: writes reach the cache
    value[1, 1, 2, 0] = -2.0
    assert flat[1, 1, bs * d + 2 * d] == -2.0


def test_flash_views_are_the_halves_of_the_last_dim_in_any_order() -> None:
    physical = torch.arange(3 * 4 * 2 * 6, dtype=torch.float32).view(3, 4, 2, 6)
    kv_cache = physical.permute(0, 2, 1, 3)  # logical [B, H, bs, 2D] over NHD memory
    key, value = kv_views(kv_cache, "flash")
    assert torch.equal(key, kv_cache[..., :3]) and torch.equal(value, kv_cache[..., 3:])
    value[2, 1, 3, 0] = -1.0
    assert physical[2, 3, 1, 3] == -1.0


def test_view_errors_say_what_is_expected() -> None:
    with pytest.raises(ValueError, match=r"2 \* head_size\], got shape \(2, 3, 4, 5\)"):
        kv_views(torch.zeros(2, 3, 4, 5), "flash")
    with pytest.raises(ValueError, match=r"layout must be 'cpu' or 'flash', got 'nhd'"):
        kv_views(torch.zeros(2, 3, 4, 6), "nhd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"contiguous slot and feature dims"):
        kv_views(torch.zeros(2, 4, 3, 6).permute(0, 2, 1, 3), "cpu")


def valid_args() -> dict[str, torch.Tensor]:
    key, value = kv_views(torch.zeros(NUM_BLOCKS, 2, 16, 80), "flash")
    keep = torch.tensor([[0, 3, 70], [1, 2, 79]])
    return {"key": key, "value": value, "block_ids": torch.tensor(REQUEST_BLOCKS), "keep": keep}


def long_tensor(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)


F64 = torch.zeros(NUM_BLOCKS, 2, 16, 40, dtype=torch.float64)
# (arguments replacing valid_args's, the error's message)
INVALID = [
    ({"key": torch.zeros(16, 2, 16)}, r"key must be a 4-D view .* got shape \(16, 2, 16\)"),
    (
        {"value": torch.zeros(16, 2, 16, 41)},
        r"value must have key's shape \(16, 2, 16, 40\), got \(16, 2, 16, 41\)",
    ),
    ({"key": F64, "value": F64.clone()}, r"one dtype of .* got torch.float64 and torch.float64"),
    ({"value": torch.zeros(16, 2, 16, 40).half()}, r"got torch.float32 and torch.float16"),
    (
        {"block_ids": torch.tensor(REQUEST_BLOCKS, dtype=torch.int16)},
        r"block_ids must be a 1-D int32/int64 .* dtype torch.int16",
    ),
    (
        {"keep": long_tensor([[0, 3, 70]])},
        r"keep must be an int32/int64 tensor \[num_kv_heads=2, count\], got shape \(1, 3\)",
    ),
    ({"keep": torch.zeros(2, 3)}, r"dtype torch.float32"),
    (
        {"keep": torch.zeros(2, 3, dtype=torch.long, device="meta")},
        r"keep must be on cpu like key, got meta",
    ),
    (
        {"keep": torch.arange(81).expand(2, 81)},
        r"count 81 exceeds the request's 5 blocks of 16 slots \(80\)",
    ),
    (
        {"block_ids": torch.tensor([9, 2, 16, 5, 11])},
        r"block_ids must lie in \[0, 16\) .* from 2 to 16",
    ),
    (
        {"block_ids": torch.tensor([9, 2, 14, 2, 11])},
        r"must not repeat a block, got \[9, 2, 14, 2, 11\]",
    ),
    (
        {"keep": long_tensor([[0, 3, 80], [1, 2, 79]])},
        r"tokens \[0, 80\) \(5 blocks of 16\), got values from 0 to 80",
    ),
    ({"keep": long_tensor([[0, 3, 70], [-1, 2, 79]])}, r"got values from -1 to 79"),
    (
        {"keep": long_tensor([[0, 3, 70], [1, 1, 79]])},
        r"strictly ascending per head; head 1 is \[1, 1, 79\]",
    ),
    ({"keep": long_tensor([[0, 3, 70], [5, 2, 79]])}, r"head 1 is \[5, 2, 79\]"),
]


@pytest.mark.parametrize(("change", "message"), INVALID, ids=[m[:40] for _, m in INVALID])
@pytest.mark.parametrize("op", [compact_kv_, compact_kv_reference_, compact_kv_triton_])
def test_invalid_arguments_are_refused_untouched(op, change: dict, message: str) -> None:
    args = {**valid_args(), **change}
    before = args["key"].clone()
    with pytest.raises(ValueError, match=message):
        op(**args)
    assert torch.equal(args["key"], before)


def test_key_and_value_must_differ() -> None:
    key, _ = kv_views(torch.zeros(NUM_BLOCKS, 2, 16, 80), "flash")
    with pytest.raises(ValueError, match=r"key and value are the same memory"):
        compact_kv_triton_(key, key, torch.tensor(REQUEST_BLOCKS), long_tensor([[0], [1]]))


def test_index_checks_can_be_skipped_by_callers_who_checked() -> None:
    args = valid_args()
    args["keep"] = long_tensor([[0, 3, 70], [5, 2, 79]])  # not ascending: found only by reading
    compact_kv_reference_(**args, check_indices=False)  # no error: the caller vouched for them


def test_round_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"round_tokens must be >= 1, got 0"):
        compact_kv_triton_(**valid_args(), round_tokens=0)
