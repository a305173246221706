"""The window_attention_mass kernels (Triton, run by the interpreter on CPU) and the torch path
against a float64 naive reference that scores token by token from the gathered keys.

Every paged cache starts full of NaN; only the request's slots below `length` are written. Other
requests' blocks, the stale slots of the last block, a spare block at the end of the block table
and (CPU layout) the V rows next to the K rows stay NaN, so any read of them shows up as NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from kernel_compare import assert_bitwise_equal, assert_rel_rms

from vllm_adaptive.kernels import kv_score as module
from vllm_adaptive.kernels.kv_compact import kv_views
from vllm_adaptive.kernels.kv_score import (
    window_attention_mass,
    window_attention_mass_reference,
    window_attention_mass_triton,
)

TOL = 1e-5  # float32 softmax and sums over at most a few hundred terms, inputs upcast exactly
NAN = float("nan")
LAYOUTS = ("cpu", "flash", "dim_strided")


def paged_key_view(
    layout: str, num_blocks: int, num_kv_heads: int, block_size: int, head_size: int,
    dtype: torch.dtype, fill: float = NAN,
) -> torch.Tensor:
    """The K view [num_blocks, H, block_size, D] of a layer cache [num_blocks, H, block_size, 2D]
    (vLLM 0.32's logical shape) filled with `fill`.

    cpu: the CPU backend's keys (kv_compact.kv_views: per block and head, [D, bs] transposed).
    flash: FlashAttention's kv[..., :D] of an NHD cache (physical [B, bs, H, 2D]).
    dim_strided: kv[..., :D] of a physical [B, 2D, bs, H] cache, so head_size is not stride 1.
    """
    shape = (num_blocks, num_kv_heads, block_size, 2 * head_size)
    if layout == "cpu":
        return kv_views(torch.full(shape, fill, dtype=dtype), "cpu")[0]
    if layout == "flash":
        cache = torch.full((num_blocks, block_size, num_kv_heads, 2 * head_size), fill, dtype=dtype)
        return cache.permute(0, 2, 1, 3)[..., :head_size]
    if layout == "dim_strided":
        cache = torch.full((num_blocks, 2 * head_size, block_size, num_kv_heads), fill, dtype=dtype)
        return cache.permute(0, 3, 2, 1)[..., :head_size]
    raise AssertionError(layout)


def write_tokens(key: torch.Tensor, block_ids: torch.Tensor, tokens: torch.Tensor) -> None:
    """key[block_ids[t // bs], :, t % bs] = tokens[t] for t < len(tokens)."""
    block_size = key.shape[2]
    t = torch.arange(tokens.shape[0])
    key[block_ids.long()[t // block_size], :, t % block_size] = tokens.to(key.dtype)


def gather_tokens(key: torch.Tensor, block_ids: torch.Tensor, length: int) -> torch.Tensor:
    """The request's keys as a contiguous [length, H, D] float64 tensor."""
    block_size = key.shape[2]
    t = torch.arange(length)
    return key[block_ids.long()[t // block_size], :, t % block_size].double()


def naive_scores(
    query: torch.Tensor, keys: torch.Tensor, scale: float, causal: bool = True
) -> torch.Tensor:
    """float64 [H, length]: for each window row and q head, a softmax over only the keys it sees."""
    window, num_q_heads, _ = query.shape
    length, num_kv_heads, _ = keys.shape
    group = num_q_heads // num_kv_heads
    q = query.double()
    scores = torch.zeros(num_kv_heads, length, dtype=torch.float64)
    for i in range(window):
        seen = length - window + i + 1 if causal else length
        for j in range(num_q_heads):
            h = j // group
            logits = torch.stack([scale * torch.dot(q[i, j], keys[p, h]) for p in range(seen)])
            scores[h, :seen] += torch.softmax(logits, dim=0)
    return scores


@dataclass(frozen=True)
class Case:
    layout: str
    num_q_heads: int
    num_kv_heads: int
    head_size: int
    block_size: int
    length: int
    window: int
    index_dtype: torch.dtype = torch.int32

    def __str__(self) -> str:
        return (
            f"{self.layout}-q{self.num_q_heads}kv{self.num_kv_heads}-D{self.head_size}"
            f"-bs{self.block_size}-L{self.length}-w{self.window}"
        )


# GQA groups 1, 2, 4 and MQA; odd head sizes; lengths off the block grid; w = 1 and w = length.
CASES = [
    Case("cpu", 4, 4, 40, 16, 37, 5),
    Case("flash", 4, 2, 72, 16, 50, 7, torch.int64),
    Case("dim_strided", 8, 2, 40, 8, 29, 29),
    Case("cpu", 4, 1, 72, 16, 45, 1, torch.int64),
    Case("flash", 2, 1, 40, 32, 70, 9),
    Case("cpu", 8, 2, 16, 8, 1, 1),
]


@dataclass
class Request:
    key: torch.Tensor  # the layer's K view, NaN outside the request's first `length` slots
    block_ids: torch.Tensor
    length: int
    query: torch.Tensor
    scale: float


def make_request(
    case: Case, dtype: torch.dtype = torch.float32, seed: int = 0, fill: float = NAN,
    query_dtype: torch.dtype | None = None,
) -> Request:
    g = torch.Generator().manual_seed(seed)
    used = -(-case.length // case.block_size)
    num_blocks = 3 * used + 2
    # Scattered, non-monotonic, with one spare (never written) block at the end of the table.
    block_ids = torch.randperm(num_blocks, generator=g)[: used + 1].to(case.index_dtype)
    key = paged_key_view(
        case.layout, num_blocks, case.num_kv_heads, case.block_size, case.head_size, dtype, fill
    )
    tokens = torch.randn(case.length, case.num_kv_heads, case.head_size, generator=g)
    write_tokens(key, block_ids, tokens)
    query = torch.randn(case.window, case.num_q_heads, case.head_size, generator=g) * 1.5
    query = query.to(query_dtype or dtype)
    return Request(key, block_ids, case.length, query, case.head_size**-0.5)


def triton_scores(r: Request, **kw: object) -> torch.Tensor:
    return window_attention_mass_triton(r.query, r.key, r.block_ids, r.length, r.scale, **kw)


def expected_scores(r: Request, causal: bool = True) -> torch.Tensor:
    return naive_scores(r.query, gather_tokens(r.key, r.block_ids, r.length), r.scale, causal)


def test_kernels_run_in_the_interpreter() -> None:
    assert type(module._window_lse_kernel).__name__ == "InterpretedFunction"
    assert type(module._window_mass_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("tiles", [{}, {"block_m": 16, "block_n": 16}], ids=["default", "16x16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_naive_reference(case: Case, tiles: dict[str, int]) -> None:
    r = make_request(case)
    got = triton_scores(r, **tiles)
    assert got.dtype == torch.float32 and got.shape == (case.num_kv_heads, case.length)
    assert_rel_rms(got, expected_scores(r), TOL, str(case))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_path_matches_naive_reference(case: Case) -> None:
    r = make_request(case)
    got = window_attention_mass_reference(r.query, r.key, r.block_ids, r.length, r.scale)
    assert_rel_rms(got, expected_scores(r), TOL, str(case))


@pytest.mark.parametrize("causal", [True, False])
def test_each_row_gives_one_unit_of_mass_per_q_head(causal: bool) -> None:
    case = CASES[2]  # w = length = 29, group 4
    r = make_request(case, seed=1)
    group = case.num_q_heads // case.num_kv_heads
    reference = window_attention_mass_reference(
        r.query, r.key, r.block_ids, r.length, r.scale, causal=causal
    )
    for got in (triton_scores(r, causal=causal, block_m=16, block_n=16), reference):
        totals = got.double().sum(dim=1)
        assert torch.allclose(totals, torch.full_like(totals, case.window * group), rtol=1e-6)


def test_non_causal_window_sees_every_key() -> None:
    r = make_request(CASES[1], seed=2)
    got = triton_scores(r, causal=False, block_m=16, block_n=16)
    assert_rel_rms(got, expected_scores(r, causal=False), TOL, "causal=False")
    assert not torch.allclose(got, triton_scores(r, causal=True), atol=1e-3)


def test_future_keys_get_no_mass() -> None:
    # The key right after window row 0's position is huge and aligned with row 0's first q head
    # of each kv head: seen by row 0, it would take all of that head's mass.
    case = Case("cpu", 4, 2, 40, 8, 30, 6)
    r = make_request(case, seed=3)
    group = case.num_q_heads // case.num_kv_heads
    future = case.length - case.window + 1
    keys = gather_tokens(r.key, r.block_ids, case.length)
    for h in range(case.num_kv_heads):
        keys[future, h] = 30 * r.query[0, h * group].double()
    write_tokens(r.key, r.block_ids, keys)
    if_seen = naive_scores(r.query[:1], keys, r.scale, causal=False)[:, future]
    assert (if_seen > 0.99).all()  # the data would show a leak
    got = triton_scores(r, block_m=16, block_n=16)
    assert_rel_rms(got, expected_scores(r), TOL, "huge future key")
    # Key p is seen by rows i >= p - (length - window) only: at most one unit per row and q head.
    positions = torch.arange(case.length - case.window, case.length)
    cap = group * (case.length - positions).double()
    assert (got[:, positions].double() <= cap + 1e-5).all()


def test_query_may_be_a_strided_view() -> None:
    # A window ring stored [num_q_heads, w, D] and read transposed: same values, same scores.
    r = make_request(CASES[1], seed=11)
    ring_order = r.query.transpose(0, 1).contiguous()
    view = Request(r.key, r.block_ids, r.length, ring_order.transpose(0, 1), r.scale)
    assert not view.query.is_contiguous()
    assert_bitwise_equal(triton_scores(view), triton_scores(r), "transposed query")


@pytest.mark.parametrize("fill", [0.0, float("inf"), -1e30, 3e38])
def test_stale_slots_and_other_blocks_are_never_read(fill: float) -> None:
    # Same request in a cache whose unused slots hold `fill` instead of NaN: bitwise the same.
    case = CASES[1]
    nan_cache, other = make_request(case, seed=4), make_request(case, seed=4, fill=fill)
    assert_bitwise_equal(triton_scores(other), triton_scores(nan_cache), f"fill {fill}")


@pytest.mark.parametrize("query_dtype", [None, torch.float32], ids=["same", "float32_query"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_caches(dtype: torch.dtype, query_dtype: torch.dtype | None) -> None:
    # The reference sees the same rounded inputs; the kernel multiplies them exactly and sums in
    # float32, so the tolerance is the float32 one.
    case = CASES[0]
    r = make_request(case, dtype=dtype, seed=5, query_dtype=query_dtype)
    expected = expected_scores(r)
    assert_rel_rms(triton_scores(r, block_m=16, block_n=16), expected, TOL, f"{dtype} kernel")
    reference = window_attention_mass_reference(r.query, r.key, r.block_ids, r.length, r.scale)
    assert_rel_rms(reference, expected, TOL, f"{dtype} torch path")


@pytest.mark.parametrize("impl", [window_attention_mass_triton, window_attention_mass_reference])
def test_h2o_accumulates_decode_steps_into_out(impl: Callable[..., torch.Tensor]) -> None:
    # Step 1 scores the query of token L - 1 over L keys; step 2 writes token L's key (vLLM
    # writes the KV before attention) and adds its query's mass over L + 1 keys.
    case = Case("flash", 4, 2, 40, 16, 33, 1)
    r = make_request(case, seed=6)
    g = torch.Generator().manual_seed(7)
    length = case.length
    new_key = torch.randn(1, 2, 40, generator=g).double()
    keys = torch.cat([gather_tokens(r.key, r.block_ids, length), new_key])
    second_query = torch.randn(1, 4, 40, generator=g)
    buffer = torch.zeros(case.num_kv_heads, length + 4)  # H2O's [Hkv, P] row, P > length + 1
    buffer[:, length + 1 :] = NAN  # past the request: must stay untouched

    first = impl(r.query, r.key, r.block_ids, length, r.scale, out=buffer[:, :length])
    write_tokens(r.key, r.block_ids, keys)
    second = impl(
        second_query, r.key, r.block_ids, length + 1, r.scale, out=buffer[:, : length + 1]
    )

    assert first.data_ptr() == second.data_ptr() == buffer.data_ptr()
    expected = naive_scores(second_query, keys, r.scale)
    expected[:, :length] += naive_scores(r.query, keys[:length], r.scale)
    assert_rel_rms(buffer[:, : length + 1], expected, TOL, "two decode steps")
    assert torch.isnan(buffer[:, length + 1 :]).all()


def test_block_offsets_beyond_int32() -> None:
    # The request's blocks sit past element 2**32 of an uninitialised 8 GiB float16 cache
    # (Linux commits only the pages written; the interpreter reads CPU tensors in place): with
    # int32 offsets, block * block_stride wraps to a small offset, a block of never-written
    # zero pages, and the scores differ. int32 block ids, as vLLM's block table has them.
    head_size, block_size = 64, 16
    block_stride = block_size * 2 * head_size  # cpu layout, one kv head: 2048 elements
    first = 2**32 // block_stride
    num_blocks = first + 8
    cache = torch.empty((num_blocks, 1, block_size, 2 * head_size), dtype=torch.float16)
    key = kv_views(cache, "cpu")[0]
    block_ids = torch.tensor([first + 5, first + 1, first + 7], dtype=torch.int32)
    assert int(block_ids.min()) * key.stride(0) >= 2**32
    g = torch.Generator().manual_seed(8)
    write_tokens(key, block_ids, torch.randn(40, 1, head_size, generator=g))
    query = torch.randn(3, 2, head_size, generator=g).half()
    expected = naive_scores(query, gather_tokens(key, block_ids, 40), head_size**-0.5)
    got = window_attention_mass_triton(query, key, block_ids, 40, head_size**-0.5)
    assert_rel_rms(got, expected, TOL, "block offsets > 2**32")


def test_cpu_dispatch_is_the_torch_path() -> None:
    r = make_request(CASES[1], seed=9)
    got = window_attention_mass(r.query, r.key, r.block_ids, r.length, r.scale)
    expected = window_attention_mass_reference(r.query, r.key, r.block_ids, r.length, r.scale)
    assert torch.equal(got, expected)


def test_empty_window_adds_nothing() -> None:
    r = make_request(CASES[0], seed=10)
    out = torch.ones(CASES[0].num_kv_heads, r.length)
    for impl in (window_attention_mass_triton, window_attention_mass_reference):
        got = impl(r.query[:0], r.key, r.block_ids, r.length, r.scale, out=out)
        assert torch.equal(got, torch.ones_like(out))
        fresh = impl(r.query[:0], r.key, r.block_ids, r.length, r.scale)
        assert torch.equal(fresh, torch.zeros_like(out))


def test_validation_names_expected_and_actual() -> None:
    r = make_request(CASES[0])  # q [5, 4, 40], key [.., 4, 16, 40], 4 blocks of 16, length 37
    q, k, ids, n, s = r.query, r.key, r.block_ids, r.length, r.scale
    bad_calls = [
        (
            (q[0], k, ids, n, s),
            r"query must be 3-D \[window, num_q_heads, head_size\], got shape \(4, 40\)",
        ),
        ((q, k[0], ids, n, s), r"key must be a 4-D view .* got shape \(4, 16, 40\)"),
        ((q.double(), k, ids, n, s), r"query dtype must be one of .*got torch.float64"),
        (
            (q, k.to(torch.float8_e4m3fn), ids, n, s),
            r"key dtype must be one of .*got torch.float8_e4m3fn",
        ),
        ((q[..., :32], k, ids, n, s), r"share a non-zero head_size, got query \(5, 4, 32\)"),
        (
            (q[:, :3], k, ids, n, s),
            r"num_q_heads \(3\) must be a positive multiple of num_kv_heads \(4\)",
        ),
        ((q, k, ids.float(), n, s), r"block_ids must be a 1-D int32/int64 .*dtype torch.float32"),
        ((q, k, ids[None], n, s), r"block_ids must be a 1-D .*got shape \(1, 4\)"),
        ((q, k, ids, 4, s), r"window <= length .* got window 5, length 4"),
        ((q, k, ids, 65, s), r"window <= length .* length 65, 4 blocks of 16 slots \(64\)"),
        ((q, k, ids, 37.0, s), r"length must be an int, got 37.0"),
        ((q[:1], k, ids, True, s), r"length must be an int, got True"),
        ((q.to("meta"), k, ids, n, s), r"key must be on meta like query, got cpu"),
        ((q, k, ids, n, float("nan")), r"scale must be a finite float, got nan"),
        (
            (q, k, ids, n, s, torch.zeros(4, 36)),
            r"out must be float32 \[4, 37\] .* got torch.float32 \[4, 36\]",
        ),
        ((q, k, ids, n, s, torch.zeros(4, 37).half()), r"out must be float32 .* got torch.float16"),
        ((q, k, ids, n, s, torch.zeros(4, 1).expand(4, 37)), r"out must not be an expanded"),
    ]
    impls = (window_attention_mass, window_attention_mass_triton, window_attention_mass_reference)
    for impl in impls:
        for args, message in bad_calls:
            with pytest.raises(ValueError, match=message):
                impl(*args)
    with pytest.raises(ValueError, match=r"block_n must be a power of two >= 16, got 24"):
        window_attention_mass_triton(q, k, ids, n, s, block_n=24)
