"""The scheduler half of KV compaction (vllm_adaptive.kvcache.scheduler) on vLLM's real Scheduler
and KV cache manager, in this process (no engine: the steps' model outputs are made up here).

Expected block counts come from the rule (a request holding P tokens owns ceil(P / 16) blocks)
and vLLM's own pool, never from the scheduler's counters.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from vllm_adaptive.kvcache.budget import BudgetRule
from vllm_adaptive.kvcache.scheduler import PLAN_ATTRIBUTE, CompactingScheduler, Compaction, KVPlan

BLOCK = 16
RULE = BudgetRule(rule="ratio", ratio=0.25, min_tokens=8, sinks=4, recent=4, buffer=16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler(CompactingScheduler):
    """Requests whose id starts with "c" are compacted with RULE."""

    def budget_rule_of(self, request):  # noqa: ANN001, ANN201
        return RULE if request.request_id.startswith("c") else None


def make_scheduler(model: Path, num_blocks: int = 40, cls: type = Scheduler):  # noqa: ANN201
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=str(model), dtype="float32", max_model_len=1024, seed=0)
    scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=1024,
                                       is_encoder_decoder=False, enable_chunked_prefill=True)
    cache_config = CacheConfig(block_size=BLOCK, enable_prefix_caching=True)
    cache_config.num_gpu_blocks = num_blocks
    config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float32)
    kv_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return cls(config, kv_config, StructuredOutputManager(config), block_size=BLOCK)


def request(rid: str, prompt_len: int, max_tokens: int = 200):  # noqa: ANN201
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    # The same prompt for every request: a prefix cache hit wherever one is allowed.
    return Request(rid, [1 + i % 50 for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   None, block_hasher=get_request_block_hasher(BLOCK, sha256))


def step(scheduler, reports=None):  # noqa: ANN001, ANN201
    """One engine step: schedule, then a model output with token 7 for every request that
    finished its prompt this step or is decoding (and `reports`, the workers' entropy measures,
    on it as patch kv-compaction-reports puts them)."""
    from vllm.v1.outputs import ModelRunnerOutput

    from vllm_adaptive.kvcache.plan import REPORT_ATTRIBUTE

    output = scheduler.schedule()
    req_ids = list(output.num_scheduled_tokens)
    sampled = []
    for rid in req_ids:
        r = scheduler.requests[rid]
        sampled.append([7] if r.num_computed_tokens >= r.num_tokens else [])
    model_output = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                     sampled_token_ids=sampled, logprobs=None, prompt_logprobs_dict={},
                                     pooler_output=[])
    if reports is not None:
        setattr(model_output, REPORT_ATTRIBUTE, reports)
    scheduler.update_from_output(output, model_output)
    return output


def blocks_of(scheduler, rid: str) -> int:  # noqa: ANN001
    return len(scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks[rid])


def free_blocks(scheduler) -> int:  # noqa: ANN001
    return scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def test_without_a_rule_it_schedules_as_vllm_does(tiny_model: Path) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler as VllmScheduler

    ours, theirs = make_scheduler(tiny_model, cls=CompactingScheduler), make_scheduler(tiny_model, cls=VllmScheduler)
    for scheduler in (ours, theirs):
        for rid, n in (("a", 100), ("b", 40)):
            scheduler.add_request(request(rid, n))
    for _ in range(6):
        mine, vllm = step(ours), step(theirs)
        assert mine.num_scheduled_tokens == vllm.num_scheduled_tokens
        assert free_blocks(ours) == free_blocks(theirs)
        plan = getattr(mine, PLAN_ATTRIBUTE)
        assert isinstance(plan, KVPlan) and plan.compact == {} and plan.evicted == {}


def test_after_the_prompt_the_tail_blocks_go_back_to_the_pool_in_the_same_step(tiny_model: Path) -> None:
    scheduler = make_scheduler(tiny_model)
    start = free_blocks(scheduler)
    scheduler.add_request(request("c1", 100))
    step(scheduler)  # the prompt: 100 tokens in 7 blocks, one token sampled
    assert blocks_of(scheduler, "c1") == 7 and free_blocks(scheduler) == start - 7
    output = step(scheduler)  # compacted to ceil(0.25 * 100) = 25 tokens before vLLM schedules
    plan = getattr(output, PLAN_ATTRIBUTE)
    assert plan.compact == {"c1": Compaction(physical=100, keep=25)} and plan.evicted == {"c1": 75}
    # 25 kept + this step's token at physical slot 25 fit in 2 blocks: 5 freed, none allocated.
    assert blocks_of(scheduler, "c1") == 2 and free_blocks(scheduler) == start - 2
    assert output.num_scheduled_tokens == {"c1": 1}
    r = scheduler.requests["c1"]
    assert r.num_computed_tokens == 101  # logical length unchanged
    counters = scheduler.kv_counters
    assert (counters.compactions, counters.tokens_evicted, counters.blocks_freed) == (1, 75, 5)


def test_decode_recompacts_at_budget_plus_buffer_and_allocates_on_the_physical_length(tiny_model: Path) -> None:
    scheduler = make_scheduler(tiny_model)
    start = free_blocks(scheduler)
    scheduler.add_request(request("c1", 100))
    step(scheduler)
    compactions = []
    for i in range(40):
        output = step(scheduler)
        plan = getattr(output, PLAN_ATTRIBUTE)
        if plan.compact:
            compactions.append((i, plan.compact["c1"]))
        r = scheduler.requests["c1"]
        physical = r.num_computed_tokens - scheduler.kv_evicted["c1"]
        # Blocks follow the physical length (the logical one would need ceil(141 / 16) = 9).
        assert blocks_of(scheduler, "c1") == cdiv(physical, BLOCK)
        assert free_blocks(scheduler) == start - cdiv(physical, BLOCK)
    # After the prompt to 25; then every time 25 + 16 = 41 tokens are held, back to 25.
    assert compactions == [(0, Compaction(100, 25)), (16, Compaction(41, 25)), (32, Compaction(41, 25))]
    assert scheduler.kv_evicted["c1"] == 75 + 16 + 16


def test_freed_blocks_admit_a_request_that_did_not_fit(tiny_model: Path) -> None:
    # 12 blocks (one is vLLM's null block): a 100-token prompt takes 7; a second one (7 more)
    # waits until the first is compacted to 2 blocks.
    scheduler = make_scheduler(tiny_model, num_blocks=12)
    scheduler.add_request(request("c1", 100))
    scheduler.add_request(request("b", 100))
    first = step(scheduler)
    assert list(first.num_scheduled_tokens) == ["c1"]
    second = step(scheduler)
    assert second.num_scheduled_tokens == {"c1": 1, "b": 100}
    assert getattr(second, PLAN_ATTRIBUTE).compact == {"c1": Compaction(100, 25)}
    assert blocks_of(scheduler, "b") == 7 and blocks_of(scheduler, "c1") == 2


def test_compacted_requests_never_share_blocks_with_the_prefix_cache(tiny_model: Path) -> None:
    scheduler = make_scheduler(tiny_model)
    scheduler.add_request(request("b", 100))  # not compacted: its full blocks enter the prefix cache
    step(scheduler)
    compacted = request("c1", 100)
    scheduler.add_request(compacted)
    assert compacted.skip_reading_prefix_cache
    step(scheduler)
    pool = scheduler.kv_cache_manager.block_pool
    owned = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks["c1"]
    assert all(pool.is_block_writable(b) for b in owned)  # no hit taken, none cached
    shared = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks["b"]
    assert not {b.block_id for b in owned} & {b.block_id for b in shared}


def test_a_shared_kept_block_refuses_the_compaction_and_frees_nothing(tiny_model: Path) -> None:
    scheduler = make_scheduler(tiny_model)
    scheduler.add_request(request("c1", 100))
    step(scheduler)
    owned = scheduler.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks["c1"]
    owned[0].ref_cnt += 1  # as if another request held it
    free = free_blocks(scheduler)
    output = step(scheduler)
    assert getattr(output, PLAN_ATTRIBUTE).compact == {} and "c1" not in scheduler.kv_evicted
    assert blocks_of(scheduler, "c1") == 7 and free_blocks(scheduler) == free
    assert scheduler.kv_counters.refused == 1
    owned[0].ref_cnt -= 1


def test_preemption_drops_the_eviction_state_and_the_request_is_compacted_again(tiny_model: Path) -> None:
    from vllm.v1.request import RequestStatus

    scheduler = make_scheduler(tiny_model)
    start = free_blocks(scheduler)
    scheduler.add_request(request("c1", 100))
    step(scheduler)
    step(scheduler)
    assert scheduler.kv_evicted == {"c1": 75}
    r = scheduler.requests["c1"]
    scheduler.running.remove(r)  # as vLLM's scheduler does before preempting
    scheduler._preempt_request(r, time.monotonic())  # back to the waiting queue
    assert r.status == RequestStatus.PREEMPTED and r.num_computed_tokens == 0
    assert scheduler.kv_evicted == {} and free_blocks(scheduler) == start
    resumed = step(scheduler)  # recomputed at full length: prompt + the 2 tokens sampled
    assert resumed.num_scheduled_tokens == {"c1": 102} and getattr(resumed, PLAN_ATTRIBUTE).compact == {}
    again = step(scheduler)
    assert getattr(again, PLAN_ATTRIBUTE).compact == {"c1": Compaction(102, 26)}


def test_finished_requests_leave_no_state_and_the_pool_returns_to_its_start(tiny_model: Path) -> None:
    from vllm.v1.request import RequestStatus

    scheduler = make_scheduler(tiny_model)
    start = free_blocks(scheduler)
    for rid, n in (("c1", 100), ("c2", 70), ("b", 50)):
        scheduler.add_request(request(rid, n, max_tokens=30))
    for _ in range(35):
        step(scheduler)
    assert not scheduler.requests and scheduler.kv_evicted == {} and scheduler.kv_budgets == {}
    assert free_blocks(scheduler) == start
    scheduler.add_request(request("c3", 100))
    step(scheduler)
    step(scheduler)
    scheduler.finish_requests("c3", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_evicted == {} and free_blocks(scheduler) == start


def test_the_entropy_rule_compacts_one_step_after_the_workers_measure(tiny_model: Path) -> None:
    """The first eligible step asks the workers to measure the window (KVPlan.measure, nothing
    compacted); their report on that step's output fixes the budget, ceil(multiplier x effective
    tokens) + sinks + recent, and the request is compacted at the next step; one they could not
    measure is never compacted (counted)."""
    import math

    class Entropy(CompactingScheduler):
        def budget_rule_of(self, request):  # noqa: ANN001, ANN201
            if not request.request_id.startswith("c"):
                return None
            return BudgetRule(rule="entropy", multiplier=2.0, min_tokens=8, sinks=4, recent=4, buffer=16)

    scheduler = make_scheduler(tiny_model, cls=Entropy)
    for rid in ("c1", "c2"):
        scheduler.add_request(request(rid, 100))
    first = getattr(step(scheduler), PLAN_ATTRIBUTE)  # both prompts prefilled
    assert first.measure == {} and first.compact == {}
    second = getattr(step(scheduler, reports={"c1": 10.4, "c2": None}), PLAN_ATTRIBUTE)
    assert second.measure == {"c1": 100, "c2": 100} and second.compact == {}
    assert set(second.observe) == {"c1", "c2"}  # the workers keep their queries for the measure
    before = free_blocks(scheduler)
    third = getattr(step(scheduler), PLAN_ATTRIBUTE)
    budget = math.ceil(2.0 * 10.4) + 4 + 4
    assert third.measure == {} and third.compact == {"c1": Compaction(101, budget, 4, "streaming", 0)}
    # c1 went from ceil(101 / 16) blocks to ceil((budget + 1) / 16) with this step's token; c2
    # grew into its next block.
    assert free_blocks(scheduler) == before + cdiv(101, BLOCK) - cdiv(budget + 1, BLOCK) - (cdiv(102, BLOCK) - cdiv(101, BLOCK))
    assert scheduler.kv_counters.unmeasured == 1
    for _ in range(30):
        plan = getattr(step(scheduler), PLAN_ATTRIBUTE)
        assert "c2" not in plan.compact and plan.measure == {}


def test_a_budget_above_the_prompt_compacts_only_once_the_request_grows_past_it(tiny_model: Path) -> None:
    class Above(CompactingScheduler):
        def budget_rule_of(self, request):  # noqa: ANN001, ANN201
            return BudgetRule(rule="fixed", tokens=120, min_tokens=8, sinks=4, recent=4, buffer=16)

    scheduler = make_scheduler(tiny_model, cls=Above)
    scheduler.add_request(request("c1", 100))
    step(scheduler)
    compactions = []
    for i in range(40):
        plan = getattr(step(scheduler), PLAN_ATTRIBUTE)
        if plan.compact:
            compactions.append((i, plan.compact["c1"]))
    # 100 + i tokens cached when step i begins: 136 = 120 + 16 at i = 36, back to 120 (not to 100).
    assert compactions == [(36, Compaction(136, 120))]


def test_an_engine_with_settings_compaction_cannot_run_with_stops_at_start_up(tiny_model: Path) -> None:
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_adaptive.errors import ConfigError

    model_config = ModelConfig(model=str(tiny_model), dtype="float32", max_model_len=1024, seed=0)
    scheduler_config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024, max_model_len=1024,
                                       is_encoder_decoder=False)
    cache_config = CacheConfig(block_size=BLOCK, cache_dtype="fp8")
    cache_config.num_gpu_blocks = 40
    config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=8, dtype=torch.float32)
    kv_config = KVCacheConfig(num_blocks=40, kv_cache_tensors=[],
                              kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    with pytest.raises(ConfigError, match="kvcache.enabled cannot run with these settings: kv_cache_dtype is 'fp8'"):
        CompactingScheduler(config, kv_config, StructuredOutputManager(config), block_size=BLOCK)


def test_a_cpu_attention_kernel_of_unknown_layout_stops_start_up(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vllm.v1.attention.backends.cpu_attn as cpu_attn

    from vllm_adaptive.errors import ConfigError

    assert cpu_attn._get_attn_isa(torch.float32, 32, 32, "auto") in ("vec", "vec16")  # this machine
    monkeypatch.setattr(cpu_attn, "_get_attn_isa", lambda *args: "amx")
    with pytest.raises(ConfigError, match="the CPU attention kernel is 'amx'"):
        make_scheduler(tiny_model)
