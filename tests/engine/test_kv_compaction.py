"""KV compaction (issue #18) in a real vLLM engine on CPU: the scheduler half
(vllm_adaptive.kvcache.scheduler, as vLLM's `scheduler_cls`) and the worker half (the
kv-compaction-plan and kv-compaction-offsets patches) on the tiny model.

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so that its block pool
and scheduler can be read. A small KV pool (12 blocks of 32 tokens) and 64 batched tokens per
step make long prompts arrive in several chunks and make vLLM preempt requests; the scheduler
records at which output length each request was preempted (tests/kv_schedulers.py), which the
reference needs.

References: tests/kv_reference.py, transformers' Llama decoding greedily one token at a time
with its cache cut to the kept tokens (sinks + the most recent) at the moments the rule says,
every new token at its true position; a preempted request is re-prefilled there, as vLLM
recomputes it. Requests that do not ask for compaction: plain vLLM (no plugin loaded), in a
subprocess with the same engine arguments.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm import LLM, SamplingParams

import vllm_adaptive
from kv_reference import compacted_greedy
from kv_schedulers import RecordingScheduler
from vllm_processes import plain_run

pytestmark = pytest.mark.engine

MAX_TOKENS = 48
SINKS, BUFFER, BUDGET = 4, 16, 40
WINDOW = 8  # the scored policies' observation window (kvcache.window)
ENGINE = {"block_size": 32, "dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20,
          "num_gpu_blocks_override": 13, "max_num_batched_tokens": 64, "max_num_seqs": 8, "seed": 0}
COMPACT = {"kv_budget": BUDGET, "kv_sinks": SINKS, "kv_buffer": BUFFER}


def prompt(i: int, n: int) -> list[int]:
    return [1 + (i * 7 + j * 3) % 500 for j in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[LLM]:
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core (scheduler, pool) here
    try:
        # As a deployment turns it on (kvcache.enabled), with the recording subclass of the
        # scheduler that section selects.
        kwargs = vllm_adaptive.engine_kwargs({"kvcache": {"enabled": True, "window": WINDOW}}, **ENGINE)
        assert kwargs["scheduler_cls"] == "vllm_adaptive.kvcache.scheduler.CompactingScheduler"
        llm = LLM(str(tiny_model), **{**kwargs, "scheduler_cls": RecordingScheduler})
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING")
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    yield llm
    llm.llm_engine.engine_core.shutdown()


def scheduler_of(llm: LLM) -> RecordingScheduler:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    assert isinstance(scheduler, RecordingScheduler)
    return scheduler


def generate(llm: LLM, prompts: list[list[int]], extras: list[dict[str, Any] | None]) -> tuple[list[list[int]], dict[str, list[int]]]:
    """Greedy outputs, and the output lengths at which each request (by index) was preempted."""
    scheduler = scheduler_of(llm)
    scheduler.preempted_at.clear()
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=e) for e in extras]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    preempted = {}
    for internal, lengths in scheduler.preempted_at.items():
        index = next(i for i, o in enumerate(outputs) if internal.split("-")[0] == o.request_id)
        preempted[index] = lengths
    return [list(o.outputs[0].token_ids) for o in outputs], preempted


def test_compacted_requests_decode_as_a_decoder_attending_to_the_kept_tokens(engine: LLM, tiny_model: Path) -> None:
    """Two long requests without compaction and two compacted to 40 tokens, in one batch: every
    prompt is chunked (64 tokens a step), and the pool of 12 blocks makes vLLM preempt."""
    scheduler = scheduler_of(engine)
    start = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    counters = scheduler.kv_counters
    before = (counters.compactions, counters.blocks_freed)
    prompts = [prompt(0, 120), prompt(1, 120), prompt(2, 100), prompt(3, 90)]
    budgets = [None, None, BUDGET, BUDGET]
    tokens, preempted = generate(engine, prompts, [None if b is None else COMPACT for b in budgets])
    # The scenario does what it is for: a compacted request was preempted and recomputed.
    assert any(i in preempted for i in (2, 3)), preempted
    preempted_at = [preempted.get(i, []) for i in range(len(prompts))]
    reference = compacted_greedy(tiny_model, prompts, MAX_TOKENS, budgets, SINKS, BUFFER, preempted_at)
    assert tokens == reference
    # Compaction changed what the compacted requests wrote (else this test could not fail).
    full = compacted_greedy(tiny_model, prompts, MAX_TOKENS, [None] * 4, SINKS, BUFFER)
    assert tokens[2] != full[2] or tokens[3] != full[3]
    assert tokens[:2] == full[:2]
    # Blocks were freed, and every block came back once the requests finished.
    assert counters.compactions > before[0] and counters.blocks_freed > before[1]
    assert counters.tokens_held - counters.tokens_kept == counters.tokens_evicted
    assert scheduler.kv_snapshot()["requests"] >= 2
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == start
    assert scheduler.kv_evicted == {} and scheduler.kv_budgets == {}


def worker_kv(llm: LLM) -> Any:
    """The (only) worker's compaction state: the executor runs in this process."""
    from vllm_adaptive.kvcache.worker import worker_state

    executor = llm.llm_engine.engine_core.engine_core.model_executor
    return worker_state(executor.driver_worker.worker.model_runner)


def test_scored_compactions_keep_the_tokens_a_reference_decoder_scores_highest(engine: LLM, tiny_model: Path) -> None:
    """SnapKV (the attention of each request's last queries, recorded by the patched CPU
    attention), H2O (the attention every query gave, accumulated there) and key-norm selections, per layer and KV head, in one batch with a request that
    is not compacted; prompts chunked, the pool small enough that vLLM preempts."""
    state = worker_kv(engine)
    scored, degraded = state.scored, state.degraded
    prompts = [prompt(8, 120), prompt(9, 120), prompt(10, 100), prompt(11, 90), prompt(13, 80), prompt(15, 70)]
    policies = ["streaming", "streaming", "snapkv", "keynorm", "snapkv", "h2o"]
    budgets = [None, None, BUDGET, BUDGET, BUDGET, BUDGET]
    extras = [None if b is None else {**COMPACT, "kv_policy": p} for b, p in zip(budgets, policies)]
    tokens, preempted = generate(engine, prompts, extras)
    assert any(i in preempted for i in (2, 3, 4, 5)), preempted  # a scored request was recomputed
    preempted_at = [preempted.get(i, []) for i in range(len(prompts))]
    reference = compacted_greedy(tiny_model, prompts, MAX_TOKENS, budgets, SINKS, BUFFER, preempted_at,
                                 policies, WINDOW)
    assert tokens == reference
    # The scores chose other tokens than the streaming baseline would have (else this proves little).
    streaming = compacted_greedy(tiny_model, prompts, MAX_TOKENS, budgets, SINKS, BUFFER, preempted_at)
    assert all(tokens[i] != streaming[i] for i in (2, 3, 4, 5))
    assert state.scored > scored and state.degraded == degraded
    # Queries are dropped at the first step whose plan no longer lists their request.
    generate(engine, [prompt(12, 20)], [None])
    assert state.rings == {} and state.mass == {}


def test_a_failing_query_recorder_degrades_snapkv_to_streaming(
    engine: LLM, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attention still runs, the request is compacted with the streaming selection (its
    tail blocks were already freed), the fallback is counted, and the engine keeps serving."""
    from vllm_adaptive.kvcache import worker

    def broken(layer: Any, query: Any) -> None:
        raise RuntimeError("injected recorder failure")

    state = worker_kv(engine)
    degraded = state.degraded
    monkeypatch.setattr(worker, "record_queries", broken)
    prompts = [prompt(14, 100)]
    tokens, preempted = generate(engine, prompts, [{**COMPACT, "kv_policy": "snapkv"}])
    assert preempted == {}
    assert tokens == compacted_greedy(tiny_model, prompts, MAX_TOKENS, [BUDGET], SINKS, BUFFER)
    assert state.degraded > degraded


def test_entropy_budgets_come_from_the_workers_measure_of_the_window(engine: LLM, tiny_model: Path) -> None:
    """kv_budget "entropy": the workers measure each request's window attention after its prompt
    and report it on the step's output (patch kv-compaction-reports); the scheduler fixes the
    budget from it and compacts one step later, with the request's policy. Greedy tokens equal
    the reference decoder that computes the budget from transformers' attention probabilities."""
    scheduler = scheduler_of(engine)
    unmeasured = scheduler.kv_counters.unmeasured
    compactions = scheduler.kv_counters.compactions
    prompts = [prompt(18, 100), prompt(19, 110), prompt(20, 60)]
    policies = ["streaming", "snapkv", "streaming"]
    multipliers = [0.25, 0.5, None]
    extras = [{"kv_budget": "entropy", "kv_entropy_multiplier": m, "kv_sinks": SINKS, "kv_buffer": BUFFER,
               "kv_policy": p} if m is not None else None for p, m in zip(policies, multipliers)]
    tokens, preempted = generate(engine, prompts, extras)
    assert preempted == {}
    budgets = [None] * 3
    reference = compacted_greedy(tiny_model, prompts, MAX_TOKENS, budgets, SINKS, BUFFER, None, policies, WINDOW,
                                 entropy=multipliers)
    assert tokens == reference
    assert scheduler.kv_counters.compactions >= compactions + 2 and scheduler.kv_counters.unmeasured == unmeasured
    uncompacted = compacted_greedy(tiny_model, prompts, MAX_TOKENS, budgets, SINKS, BUFFER)
    assert tokens[0] != uncompacted[0] and tokens[1] != uncompacted[1] and tokens[2] == uncompacted[2]


def test_a_failing_in_layer_scorer_degrades_snapkv_to_streaming(
    engine: LLM, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SnapKV's compaction runs inside the attention layers (its window ends with the step's own
    query); a scorer that raises there still compacts every layer, with the streaming selection
    from the copied blocks, counted and logged; the engine keeps serving."""
    from vllm_adaptive.kvcache import worker

    def broken(*args: Any) -> None:
        raise RuntimeError("injected scorer failure")

    state = worker_kv(engine)
    degraded, failed = state.degraded, state.failed
    monkeypatch.setattr(worker, "deferred_selection", broken)
    prompts = [prompt(16, 100), prompt(17, 90)]
    tokens, preempted = generate(engine, prompts, [{**COMPACT, "kv_policy": "snapkv"}, None])
    assert preempted == {}
    assert tokens == compacted_greedy(tiny_model, prompts, MAX_TOKENS, [BUDGET, None], SINKS, BUFFER)
    assert state.degraded > degraded and state.failed == failed


def test_without_compaction_or_below_its_budget_the_engine_is_plain_vllm(
    engine: LLM, tiny_model: Path, tmp_path: Path
) -> None:
    prompts = [prompt(4, 70), prompt(5, 100), prompt(6, 33)]
    # Request 1 asks for compaction with a budget above its final length (100 + 48 < 200 + 16).
    extras = [None, {"kv_budget": 200, "kv_sinks": SINKS, "kv_buffer": BUFFER}, None]
    compactions = scheduler_of(engine).kv_counters.compactions
    tokens, _ = generate(engine, prompts, extras)
    assert scheduler_of(engine).kv_counters.compactions == compactions
    plain = plain_run(tiny_model, {**ENGINE, "disable_log_stats": False}, tmp_path / "plain.json",
                      prompts=[{"prompt_token_ids": p} for p in prompts], max_tokens=MAX_TOKENS)
    assert tokens == plain["greedy"]


@pytest.mark.parametrize(("extra", "key"), [
    ({"kv_budget": 0}, "kv_budget"),
    ({"kv_budget": 40, "kv_sinks": -1}, "kv_sinks"),
    ({"kv_buffer": 8}, "kv_buffer"),
])
def test_bad_values_are_refused_at_admission_naming_the_key(engine: LLM, extra: dict[str, Any], key: str) -> None:
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError) as raised:
        engine.generate([{"prompt_token_ids": prompt(7, 40)}],
                        SamplingParams(max_tokens=4, extra_args=extra), use_tqdm=False)
    assert raised.value.parameter == key and key in str(raised.value)
