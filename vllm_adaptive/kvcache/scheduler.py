"""The engine-core half of KV compaction (issue #18): a vLLM scheduler that decides, before each
step, which requests shrink to their budget, and gives their tail blocks back to the pool.

vLLM 0.32 lets a deployment choose its scheduler class (`SchedulerConfig.scheduler_cls`), so this
is a subclass, not a patch. A request keeps its logical length (token ids, positions,
`num_computed_tokens`, stop checks); what shrinks is its physical length P, the tokens its blocks
hold: P = num_computed_tokens - E, where E is how many tokens were evicted from it so far. Each
step, before vLLM schedules:

1. for every running request with a budget rule (`budget_rule_of`), once its prompt is in the
   cache (after the last prompt chunk): its budget B is fixed from its physical length the first
   time (`BudgetRule.target`, not capped at the length); it is compacted now if B < P after the
   prompt, or if P has grown to B + buffer during decode (`BudgetRule.compact_after_prompt` /
   `compact_during_decode`);
2. a compacted request keeps its first ceil(B / block_size) blocks and frees the rest; E grows by
   P - B; the worker must move the B kept tokens (any per-layer, per-head selection) into the
   first B slots in the same step, before any forward pass writes the freed blocks (the plan on
   the SchedulerOutput, `KVPlan`);
3. then vLLM's own `schedule()` runs, and allocates on the physical length: during
   `KVCacheManager.allocate_slots` a compacted request's `num_computed_tokens` is lowered by E
   (that method reads it once, at the start: tests/contract/test_kv_compaction_facts.py) and
   restored after. The freed blocks are free for every request of this very step.

Requests with a budget rule never read from or write to the prefix cache (their blocks are
private and writable in place: `skip_reading_prefix_cache` at admission, `delay_cache_blocks` at
every allocation). Preemption frees a request's blocks and zeroes its `num_computed_tokens`; its
eviction state is dropped with them (`_free_request_blocks`), so it is recomputed at full length
and compacted again from scratch; a request preempted in the step that compacted it is taken out
of that step's plan. A request whose kept blocks are not writable (shared) is not compacted and is
counted as refused; nothing is freed for it.

The deployment turns it on with `kvcache.enabled` (vllm_adaptive.kvcache.config, which sets
this class as `scheduler_cls`); requests opt in with `kv_budget` (vllm_adaptive.kvcache.params).
Settings it cannot run with stop the engine at start-up (vllm_adaptive.kvcache.compatibility).
Which tokens are kept is the worker's choice (the request's policy rides on its `Compaction`;
requests with a query-scored policy are listed in `KVPlan.observe` every step so that the
workers keep their last queries). The `entropy` budget rule needs the workers' attention: at a
request's first eligible step the plan asks the workers to measure its window
(`KVPlan.measure`), their answer comes back on that step's output (patch
kv-compaction-reports, `update_from_output`), and the request's budget is fixed, and it is
compacted, at the next step. A request the workers could not measure is never compacted
(counted as `unmeasured`; nothing was freed for it).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm_adaptive.kvcache.budget import BudgetRule
from vllm_adaptive.kvcache.config import ACCUMULATED, SCORED_BY_QUERIES, KVCompactionConfig
from vllm_adaptive.kvcache.params import parse_request, request_policy
from vllm_adaptive.kvcache.plan import PLAN_ATTRIBUTE, REPORT_ATTRIBUTE, Compaction, KVPlan
from vllm_adaptive.worker_metrics import KVCACHE, SnapshotPublisher

logger = logging.getLogger(__name__)

# The budget of a request whose window the workers could not measure: never compacted.
NOT_COMPACTED = 1 << 62


@dataclasses.dataclass
class CompactionCounters:
    requests: int = 0  # requests with a budget rule
    compactions: int = 0
    tokens_held: int = 0  # physical tokens of compacted requests before their compaction
    tokens_kept: int = 0
    tokens_evicted: int = 0
    blocks_freed: int = 0
    refused: int = 0  # a kept block was not writable, or the request's kv_* values were bad
    unmeasured: int = 0  # entropy-rule requests the workers could not measure (served uncompacted)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class CompactingScheduler(Scheduler):
    """vLLM's scheduler, plus the compaction pre-pass of the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from vllm_adaptive.config import AdaptiveConfig
        from vllm_adaptive.kvcache.compatibility import check_vllm_config

        check_vllm_config(self.vllm_config, self.kv_cache_config)
        adaptive = AdaptiveConfig.from_vllm_config(self.vllm_config)
        # The deployment's defaults for requests' kv_* keys (without the plugin's config: the
        # section's defaults; requests still opt in one by one).
        self.kv_config = adaptive.kvcache if adaptive is not None else KVCompactionConfig()
        self.kv_evicted: dict[str, int] = {}  # E per request (only requests compacted at least once)
        self.kv_budgets: dict[str, int] = {}  # B per request, fixed at its first eligible step
        self.kv_counters = CompactionCounters()
        self._kv_rules: dict[str, BudgetRule | None] = {}
        self._kv_policies: dict[str, str] = {}  # the selection of each request with a rule
        # Entropy rule: the workers' reports (effective tokens, None: not measured) not yet used,
        # and the requests they measure this step.
        self._kv_effective: dict[str, float | None] = {}
        self._kv_measure: dict[str, int] = {}
        self._kv_publisher = SnapshotPublisher.from_environment(KVCACHE, self.kv_snapshot)
        manager = self.kv_cache_manager
        manager.allocate_slots = functools.partial(_allocate_on_physical_length, self, manager.allocate_slots)

    # --- which requests, and their rule ---------------------------------------------------------

    def budget_rule_of(self, request: Request) -> BudgetRule | None:
        """The request's budget rule from its `extra_args` (vllm_adaptive.kvcache.params), or
        None when it asks for no compaction: it is then served as by vLLM's own scheduler."""
        params = request.sampling_params
        return parse_request(params.extra_args if params is not None else None, self.kv_config)

    def _rule(self, request: Request) -> BudgetRule | None:
        rid = request.request_id
        if rid not in self._kv_rules:
            try:
                rule = self.budget_rule_of(request)
            except ValueError as e:
                # Admission refuses bad values (HTTP 400); a request that reached the engine
                # another way is served without compaction, never a failed step.
                logger.warning("vllm-adaptive: request %s is not compacted: %s", rid, e)
                self.kv_counters.refused += 1
                rule = None
            self._kv_rules[rid] = rule
            if rule is not None:
                params = request.sampling_params
                self._kv_policies[rid] = request_policy(params.extra_args if params else None, self.kv_config)
                self.kv_counters.requests += 1
            self._kv_changed()
        return self._kv_rules[rid]

    def kv_snapshot(self) -> dict[str, int]:
        """The compaction counters (plain ints), for /metrics and vllm_adaptive.introspection, and
        the pool's free and usable blocks now (the null block is never usable): once every
        request has finished they are equal, compaction or not."""
        pool = self.kv_cache_manager.block_pool
        return {**dataclasses.asdict(self.kv_counters), "free_blocks": pool.get_num_free_blocks(),
                "pool_blocks": pool.num_gpu_blocks - 1}

    def _kv_changed(self) -> None:
        if self._kv_publisher is not None:
            self._kv_publisher.touch()

    def add_request(self, request: Request) -> None:
        if self._rule(request) is not None:
            # Its blocks are rewritten in place: it must never share one with another request.
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    # --- one step ---------------------------------------------------------------------------------

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        compact = self._compact_running()
        output = super().schedule(throttle_prefills)
        for rid in output.preempted_req_ids or ():
            compact.pop(rid, None)  # its blocks are gone: nothing to move
        measure = {rid: n for rid, n in self._kv_measure.items() if rid not in (output.preempted_req_ids or ())}
        observe, accumulate = self._workers_watch()
        setattr(output, PLAN_ATTRIBUTE, KVPlan(self.current_step, compact, dict(self.kv_evicted), observe, accumulate,
                                               measure))
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        # The workers' measures of entropy-rule requests (patch kv-compaction-reports); a request
        # that finished or was preempted meanwhile is measured again if it comes back.
        for rid, effective in (getattr(model_runner_output, REPORT_ATTRIBUTE, None) or {}).items():
            if rid in self._kv_rules and rid not in self.kv_budgets:
                self._kv_effective[rid] = effective
        return super().update_from_output(scheduler_output, model_runner_output)

    def _workers_watch(self) -> tuple[dict[str, int], tuple[str, ...]]:
        """Running requests whose policy or budget rule needs their last queries
        (KVPlan.observe, with the window) and those whose attention mass is accumulated
        (KVPlan.accumulate)."""
        observe: dict[str, int] = {}
        accumulate: list[str] = []
        for request in self.running:
            policy = self._kv_policies.get(request.request_id)
            rule = self._kv_rules.get(request.request_id)
            if policy in SCORED_BY_QUERIES or (rule is not None and rule.rule == "entropy"):
                observe[request.request_id] = self.kv_config.window
            if policy in ACCUMULATED:
                accumulate.append(request.request_id)
        return observe, tuple(accumulate)

    def _compact_running(self) -> dict[str, Compaction]:
        plan: dict[str, Compaction] = {}
        self._kv_measure = {}
        for request in self.running:
            rule = self._rule(request)
            if rule is None:
                continue
            # Eligible once the prompt (and, after a preemption, the replayed output) is cached.
            if request.num_computed_tokens < max(request.num_prompt_tokens, request.num_tokens - 1):
                continue
            rid = request.request_id
            evicted = self.kv_evicted.get(rid, 0)
            physical = request.num_computed_tokens - evicted
            budget = self.kv_budgets.get(rid)
            if budget is None:
                # Fixed from the prompt's length (entropy: from the workers' measure of the
                # window, asked for this step and used the next); not capped by it: a request
                # whose budget is at or above its length is compacted only if it grows to
                # budget + buffer.
                if rule.rule == "entropy":
                    if rid not in self._kv_effective:
                        self._kv_measure[rid] = physical
                        continue
                    effective = self._kv_effective.pop(rid)
                    if effective is None:
                        self.kv_counters.unmeasured += 1
                        self.kv_budgets[rid] = NOT_COMPACTED
                        self._kv_changed()
                        continue
                    budget = self.kv_budgets[rid] = rule.target(physical, effective=effective)
                else:
                    budget = self.kv_budgets[rid] = rule.target(physical)
                due = rule.compact_after_prompt(physical, budget)
            else:
                due = rule.compact_during_decode(physical, budget)
            if not due:
                continue
            freed = self._free_tail(request, budget)
            if freed is None:
                self.kv_counters.refused += 1
                continue
            self.kv_evicted[rid] = evicted + physical - budget
            policy = self._kv_policies[rid]
            recent = 0 if policy == "streaming" else self.kv_config.window
            plan[rid] = Compaction(physical, budget, min(rule.sinks, budget), policy, recent)
            counters = self.kv_counters
            counters.compactions += 1
            counters.tokens_held += physical
            counters.tokens_kept += budget
            counters.tokens_evicted += physical - budget
            counters.blocks_freed += freed
        if plan or self.kv_counters.refused:
            self._kv_changed()
        return plan

    def _free_tail(self, request: Request, keep: int) -> int | None:
        """Free the request's blocks past the first ceil(keep / block_size) of every KV cache
        group; the number freed, or None (and nothing freed) when a kept block is shared."""
        pool = self.kv_cache_manager.block_pool
        managers = self.kv_cache_manager.coordinator.single_type_managers
        owned = [m.req_to_blocks[request.request_id] for m in managers]
        kept = [blocks[: cdiv(keep, m.block_size)] for m, blocks in zip(managers, owned)]
        if not all(pool.is_block_writable(b) for blocks in kept for b in blocks):
            return None
        freed = 0
        for manager, blocks in zip(managers, owned):
            first = cdiv(keep, manager.block_size)
            tail = blocks[first:]
            del blocks[first:]  # req_to_blocks lists are the manager's own (mutable in place)
            pool.free_blocks(reversed(tail))  # the last block first: evicted first, as vLLM frees
            freed += len(tail)
        return freed

    def _free_request_blocks(self, request: Request) -> None:
        # Preempted or finished: every block goes back; so does the eviction state.
        rid = request.request_id
        self.kv_evicted.pop(rid, None)
        self.kv_budgets.pop(rid, None)
        self._kv_effective.pop(rid, None)  # measured again from its recomputed cache
        if request.is_finished():
            self._kv_rules.pop(rid, None)
            self._kv_policies.pop(rid, None)
        super()._free_request_blocks(request)
        self._kv_changed()  # the free-block gauge


def _allocate_on_physical_length(
    scheduler: CompactingScheduler, allocate: Callable[..., Any], request: Request, *args: Any, **kwargs: Any
) -> Any:
    """`KVCacheManager.allocate_slots` for `scheduler`: compacted requests allocate on their
    physical length, and requests with a budget rule never cache their blocks."""
    if scheduler._rule(request) is not None:
        kwargs["delay_cache_blocks"] = True
    evicted = scheduler.kv_evicted.get(request.request_id, 0)
    if not evicted:
        return allocate(request, *args, **kwargs)
    request.num_computed_tokens -= evicted
    try:
        return allocate(request, *args, **kwargs)
    finally:
        request.num_computed_tokens += evicted
