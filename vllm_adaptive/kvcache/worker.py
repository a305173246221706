"""The worker half of KV compaction (issue #18): run the scheduler's plan in the model runner.

Each step, the scheduler (vllm_adaptive.kvcache.scheduler) may have compacted some requests: it
freed their tail blocks before scheduling, so other requests of this very step may be given
those blocks, and vLLM zeroes freshly allocated blocks at the top of
`GPUModelRunner._update_states`. So, before vLLM's `_update_states` does anything
(`before_update_states`, from patches/gpu_model_runner_update_states.py):

1. for each compacted request, every layer's cache moves the kept tokens (`Compaction.kept_tokens`,
   per KV head) into the request's first `keep` slots (vllm_adaptive.kernels.kv_compact), reading
   the blocks the scheduler just freed before anyone else writes them;
2. the request's block ids are cut to its first ceil(keep / block_size) blocks, in the runner's
   request state and in its row of the persistent batch's block table, so that the blocks vLLM
   appends this step follow the kept prefix;
3. the plan's eviction offsets E (every compacted request the scheduler still holds) are kept for
   `_prepare_inputs`.

After vLLM's `_prepare_inputs` (`after_prepare_inputs`, patches/gpu_model_runner_prepare_inputs.py),
each compacted row's sequence length drops by E and its new tokens' KV slots are recomputed from
positions - E: the positions themselves stay logical (RoPE sees the true position), while the
cache holds the request's physical tokens [0, logical - E). vLLM's attention kernels take no
positions, only sequence lengths, block tables and slots (tests/contract/kv_compaction_probe_cases.py).

Which tokens a request keeps in each (layer, KV head) is its policy's (Compaction.policy,
vllm_adaptive.kvcache.selection): `streaming` needs nothing; `keynorm` reads the request's keys;
`snapkv` scores the keys by the attention of the request's last `window` queries, which the
workers keep for every request the plan lists in `KVPlan.observe`: `after_prepare_inputs` lists
this step's rows of those requests (the last `window` tokens each), and vLLM's CPU attention
(patch kv-compaction-queries, `record_queries`) copies their post-RoPE queries into each
request's ring, one per layer. Only queries of tokens appended since the request's last
compaction count (their physical slots are known: logical position - E); a scored selection
whose scores cannot be had (no queries kept, a failure in the scorer) falls back to the
streaming selection for that request, logged and counted (`degraded`): the scheduler has already
freed its tail blocks, so a compaction is never skipped.

The step's own query (`snapkv` on vLLM's CPU attention). A request is compacted in the step
that computes its next token (one token: the scheduler's eligibility rule), and that token's
query is the freshest evidence of what it needs: with the key of a lookup as the token, its
query is the question. So a SnapKV compaction waits for it: `before_update_states` copies the
request's blocks of every layer (`defer`, before vLLM may zero the freed ones) and cuts its
block ids as usual; at every attention layer the patched CPU attention first records the step's
queries, then `compact_in_layer` scores the request's tokens with the window ending with the
step's own query (its softmax over the copied keys and its own key), selects, and writes the
kept tokens from the copy into the request's first slots; vLLM has already written the step's
keys and values at their compacted slots (its KV update runs before the attention op), and its
attention then reads the compacted cache. Each layer's query therefore comes from layers that
already attend to their compacted caches. Where the request has no single token in the step
(not scheduled) or another attention backend runs, the compaction happens before the step, as
for the other policies, with the recorded queries only. The copy costs one request's blocks
per layer for the step.

Without a plan on the SchedulerOutput (every deployment without compaction) both functions
return at once.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from vllm_adaptive.kernels.kv_compact import compact_kv_, kv_views
from vllm_adaptive.kernels.kv_score import window_attention_mass
from vllm_adaptive.kvcache.budget import effective_tokens
from vllm_adaptive.kvcache.plan import PLAN_ATTRIBUTE, REPORT_ATTRIBUTE, Compaction, KVPlan
from vllm_adaptive.kvcache.selection import keynorm_scores, pool_scores, select_tokens
from vllm_adaptive.worker_metrics import KVWORKER, SnapshotPublisher

logger = logging.getLogger(__name__)

# The attribute of the model runner that holds its compaction state.
STATE_ATTRIBUTE = "_vllm_adaptive_kv"
# SnapKV's pooling of the window's attention mass over neighbouring tokens (so that a kept token
# comes with its neighbours: a key and the value after it), as in SnapKV (kernel 5-7).
POOL_KERNEL = 7
POOLING = "max"


@dataclasses.dataclass
class QueryRing:
    """One request's last `window` queries in every layer: the query of logical position p is
    `queries[layer, p % window]` (float32 [layers, window, q_heads, head_size]) and
    `positions[p % window] == p` once layer 0 recorded it (-1 before)."""

    queries: torch.Tensor
    positions: torch.Tensor

    @property
    def window(self) -> int:
        return self.positions.shape[0]


@dataclasses.dataclass
class StepCapture:
    """The query rows this step's forward records (module docstring): per observed request, its
    ring, the rows' indices in the step's flattened tokens, their ring slots and positions."""

    layer_index: dict[str, int]
    head_size: int
    tokens: int
    rows: list[tuple[QueryRing, torch.Tensor, torch.Tensor, torch.Tensor]]
    # Per accumulating (h2o) request: its mass buffer, its rows in this step, its block ids and
    # its physical length once this step's tokens are in the cache.
    accumulate: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WorkerKV:
    """One runner's compaction state."""

    # E of each compacted request (this step's plan).
    offsets: dict[str, int] = dataclasses.field(default_factory=dict)
    # Requests whose queries are kept (this step's plan) and their rings.
    observe: dict[str, int] = dataclasses.field(default_factory=dict)
    rings: dict[str, QueryRing] = dataclasses.field(default_factory=dict)
    # Requests whose attention mass is accumulated (h2o) and their mass [layers, KV heads, tokens]
    # over their physical tokens (grown as they grow, compacted with their cache).
    accumulate: tuple[str, ...] = ()
    mass: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # Physical length each request kept at its last compaction (queries before it do not count).
    kept_at: dict[str, int] = dataclasses.field(default_factory=dict)
    # This step's compactions that run inside the attention layers (DeferredCompaction).
    pending: list[DeferredCompaction] = dataclasses.field(default_factory=list)
    # The entropy rule's measures not yet handed to the scheduler (request id -> the mean
    # effective number of tokens, None: could not be measured); `attach_reports` sends them.
    reports: dict[str, float | None] = dataclasses.field(default_factory=dict)
    compactions: int = 0
    tokens_evicted: int = 0
    scored: int = 0  # compactions whose selection came from scores
    degraded: int = 0  # scored policies that fell back to streaming
    failed: int = 0  # in-layer compactions that did not reach every layer (their cache is stale)
    publisher: SnapshotPublisher | None = None

    def snapshot(self) -> dict[str, int]:
        return {"compactions": self.compactions, "scored": self.scored, "degraded": self.degraded,
                "failed": self.failed}


@dataclasses.dataclass
class DeferredCompaction:
    """A SnapKV compaction whose observation window ends with the query of the token this step
    computes (module docstring, "The step's own query"): the request's old blocks are copied
    into `scratch` (one tensor per cache layer, the cache's layout, room for one more token)
    before vLLM's `_update_states` may zero them; each attention layer then scores and writes
    its kept tokens from the copy (`compact_in_layer`) before vLLM's attention runs."""

    req_id: str
    compaction: Compaction
    layers: list[CacheLayer]
    scratch: list[torch.Tensor]
    kept_blocks: torch.Tensor  # the request's first ceil(keep / block_size) block ids
    block_size: int
    count: int  # window queries scored: the step's own and up to count - 1 before it
    state: WorkerKV
    row: int = -1  # the step's token of the request (set by after_prepare_inputs)
    position: int = -1  # its logical position
    streaming: bool = False  # its scores could not be had: the streaming selection
    done: set[str] = dataclasses.field(default_factory=set)  # the layers that compacted
    by_layer: dict[str, int] = dataclasses.field(init=False)  # layer name -> index in `layers`

    def __post_init__(self) -> None:
        self.by_layer = {layer.name: i for i, layer in enumerate(self.layers)}


# The runner state of this worker process whose step is recording queries (None: no recording).
_CAPTURE: StepCapture | None = None
# This step's compactions that the attention layers run (empty: none).
_DEFERRED: list[DeferredCompaction] = []
# Set by the kv-compaction-queries patch once vLLM's CPU attention runs `record_queries` and
# `compact_in_layer` at every layer: only then can a compaction wait for the step's own query.
IN_LAYER_HOOK = False


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def worker_state(runner: Any) -> WorkerKV:
    state = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None:
        state = WorkerKV()
        state.publisher = SnapshotPublisher.from_environment(KVWORKER, state.snapshot)
        setattr(runner, STATE_ATTRIBUTE, state)
    return state


def worker_snapshot(worker: Any) -> dict[str, int]:
    """A vLLM worker's compaction counters (`WorkerKV.snapshot`; zeros before its first plan),
    for `LLM.collective_rpc` in offline runs."""
    state = getattr(worker.model_runner, STATE_ATTRIBUTE, None)
    return (state if state is not None else WorkerKV()).snapshot()


def before_update_states(runner: Any, scheduler_output: Any) -> None:
    """Run the step's plan (module docstring, 1-3); nothing without one."""
    global _CAPTURE, _DEFERRED
    _CAPTURE = None  # the previous step's rows are not this step's
    if _DEFERRED:
        unfinished = [d.req_id for d in _DEFERRED if len(d.done) < len(d.layers)]
        if unfinished:  # an attention layer never ran its part: its cache of these requests is stale
            logger.error("vllm-adaptive: KV compaction of requests %s did not reach every attention layer",
                         unfinished)
            worker_state(runner).failed += len(unfinished)
    _DEFERRED = []
    plan: KVPlan | None = getattr(scheduler_output, PLAN_ATTRIBUTE, None)
    if plan is None:
        return
    state = worker_state(runner)
    for req_id in [r for r in state.rings if r not in plan.observe]:
        del state.rings[req_id]  # finished, preempted or aborted: the plan lists every running one
    for req_id in [r for r in state.kept_at if r not in plan.evicted]:
        del state.kept_at[req_id]
    for req_id in [r for r in state.mass if r not in plan.accumulate]:
        del state.mass[req_id]
    scheduled = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
    state.pending = []
    state.observe = dict(plan.observe)
    for req_id, physical in plan.measure.items():
        try:
            state.reports[req_id] = measure_window(runner, state, req_id, physical)
        except Exception as e:  # noqa: BLE001 - the request is then served uncompacted
            state.reports[req_id] = None
            state.degraded += 1
            logger.warning("vllm-adaptive: the entropy KV budget of request %s could not be measured; "
                           "it is not compacted: %s", req_id, e)
            if state.publisher is not None:
                state.publisher.touch()
    for req_id, compaction in plan.compact.items():
        compact_request(runner, state, req_id, compaction, scheduled.get(req_id, 0))
        state.compactions += 1
        state.tokens_evicted += compaction.evicted
    if plan.compact and state.publisher is not None:
        state.publisher.touch()
    state.offsets = dict(plan.evicted)
    state.observe = dict(plan.observe)
    state.accumulate = plan.accumulate


@dataclasses.dataclass(frozen=True)
class CacheLayer:
    """One KV cache tensor and the first attention layer that uses it."""

    index: int  # the layer's position in the KV cache group (its query ring row)
    name: str
    cache: torch.Tensor
    scale: float


def attention_layers(runner: Any) -> list[CacheLayer]:
    """Every KV cache tensor of the model (shared ones once), with its first layer."""
    groups = runner.kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise RuntimeError(f"KV compaction needs one KV cache group, the model has {len(groups)}")
    context = runner.compilation_config.static_forward_context
    layers, seen = [], set()
    for index, name in enumerate(groups[0].layer_names):
        layer = context.get(name)
        cache = getattr(layer, "kv_cache", None)
        if not isinstance(cache, torch.Tensor):
            raise RuntimeError(f"layer {name} has no KV cache tensor ({type(cache).__name__})")
        if cache.data_ptr() not in seen:
            seen.add(cache.data_ptr())
            layers.append(CacheLayer(index, name, cache, float(layer.impl.scale)))
    return layers


def layer_caches(runner: Any) -> list[torch.Tensor]:
    """The KV cache tensor of every attention layer (one per tensor, shared ones once)."""
    return [layer.cache for layer in attention_layers(runner)]


def compact_request(runner: Any, state: WorkerKV, req_id: str, compaction: Compaction, scheduled: int = 0) -> None:
    """Move `req_id`'s kept tokens to its first slots in every layer (now, or in the attention
    layers when its window takes this step's query), then cut its block ids. `scheduled`: the
    request's tokens in this step."""
    request = runner.requests[req_id]
    (block_ids,) = request.block_ids  # one KV cache group (refused otherwise)
    block_size = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    held = cdiv(compaction.physical, block_size)
    if len(block_ids) < held:
        raise RuntimeError(f"request {req_id} holds {len(block_ids)} blocks, fewer than its "
                           f"{compaction.physical} tokens need ({held})")
    device = runner.device
    ids = torch.tensor(block_ids[:held], dtype=torch.int64, device=device)
    layout = "cpu" if device.type == "cpu" else "flash"
    layers = attention_layers(runner)
    keep_blocks = cdiv(compaction.keep, block_size)
    if compaction.policy == "snapkv" and scheduled == 1 and IN_LAYER_HOOK and layout == "cpu":
        state.pending.append(defer(state, req_id, compaction, layers, ids, keep_blocks, block_size))
        cut_block_ids(runner, req_id, block_ids, keep_blocks)
        state.kept_at[req_id] = compaction.keep
        return
    views = [kv_views(layer.cache, layout) for layer in layers]
    kept: list[torch.Tensor] | None = None
    if compaction.policy != "streaming":
        try:
            kept = scored_selection(state, req_id, compaction, layers, views, ids)
            state.scored += 1
        except Exception as e:  # noqa: BLE001 - the tail is already freed: compact anyway
            state.degraded += 1
            logger.warning("vllm-adaptive: KV compaction of request %s fell back from %s to the "
                           "streaming selection: %s", req_id, compaction.policy, e)
    if kept is None:
        kept = [streaming_selection(compaction, key.shape[1], device) for key, _ in views]
    for (key, value), keep in zip(views, kept):
        compact_kv_(key, value, ids, keep, check_indices=False)
    state.kept_at[req_id] = compaction.keep
    mass = state.mass.get(req_id)
    if mass is not None:  # h2o: the accumulated mass follows its tokens (zero past the kept ones)
        if compaction.policy == "h2o" and mass.shape[2] >= compaction.physical:
            moved = torch.zeros_like(mass)
            for layer, keep in zip(layers, kept):
                moved[layer.index, :, : keep.shape[1]] = mass[layer.index].gather(1, keep.to(mass.device))
            state.mass[req_id] = moved
        else:
            del state.mass[req_id]  # nothing to carry: scored compactions of it degrade from now
    cut_block_ids(runner, req_id, block_ids, keep_blocks)


def streaming_selection(compaction: Compaction, heads: int, device: torch.device) -> torch.Tensor:
    """The streaming selection (`Compaction.kept_tokens`) for every one of `heads` KV heads
    [heads, keep]: the streaming policy's, and every scored policy's fallback."""
    return torch.tensor(compaction.kept_tokens(), dtype=torch.int64, device=device).expand(heads, -1)


def cut_block_ids(runner: Any, req_id: str, block_ids: list[int], keep_blocks: int) -> None:
    """The request keeps its first `keep_blocks` block ids (its runner state and its row of the
    persistent batch's block table)."""
    del block_ids[keep_blocks:]
    row = runner.input_batch.req_id_to_index.get(req_id)
    if row is not None:
        table = runner.input_batch.block_table[0]
        before = int(table.num_blocks_per_row[row])
        table.block_table.np[row, keep_blocks:before] = 0
        table.num_blocks_per_row[row] = min(before, keep_blocks)


def scored_selection(state: WorkerKV, req_id: str, compaction: Compaction, layers: list[CacheLayer],
                     views: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor) -> list[torch.Tensor]:
    """The kept tokens [KV heads, keep] of each cache tensor under a scored policy."""
    physical, keep = compaction.physical, compaction.keep
    if compaction.policy == "keynorm":
        def scores_of(layer: CacheLayer, key: torch.Tensor) -> torch.Tensor:
            return keynorm_scores(gather_keys(key, ids, physical))
    elif compaction.policy == "h2o":
        mass = state.mass.get(req_id)
        if mass is None or mass.shape[2] < physical:
            raise RuntimeError("no attention mass was accumulated for it (is the attention backend vLLM's CPU one?)")

        def scores_of(layer: CacheLayer, key: torch.Tensor) -> torch.Tensor:
            return mass[layer.index, :, :physical]
    elif compaction.policy == "snapkv":

        queries = window_queries(state, req_id, physical)

        def scores_of(layer: CacheLayer, key: torch.Tensor) -> torch.Tensor:
            mass = window_attention_mass(queries[layer.index], key, ids, physical, layer.scale)
            return pool_scores(mass, POOL_KERNEL, POOLING)
    else:
        raise ValueError(f"unknown KV compaction policy {compaction.policy!r}")
    return [select_tokens(scores_of(layer, key), physical, keep, compaction.sinks, compaction.recent)
            for layer, (key, _) in zip(layers, views)]


def gather_keys(key: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
    """The request's first `length` keys [KV heads, length, head_size] from a paged key view."""
    blocks = key.index_select(0, ids).transpose(0, 1)  # [H, blocks, block_size, D]
    return blocks.reshape(blocks.shape[0], -1, blocks.shape[-1])[:, :length]


def measure_window(runner: Any, state: WorkerKV, req_id: str, physical: int) -> float:
    """The entropy budget rule's measure of a request: the mean effective number of tokens
    (`budget.effective_tokens`) of its window's attention mass over every layer and KV head."""
    (block_ids,) = runner.requests[req_id].block_ids
    block_size = runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
    ids = torch.tensor(block_ids[: cdiv(physical, block_size)], dtype=torch.int64, device=runner.device)
    queries = window_queries(state, req_id, physical)
    layout = "cpu" if runner.device.type == "cpu" else "flash"
    counts = []
    for layer in attention_layers(runner):
        key, _ = kv_views(layer.cache, layout)
        counts.append(effective_tokens(window_attention_mass(queries[layer.index], key, ids, physical, layer.scale)))
    return float(torch.cat(counts).mean())


def attach_reports(runner: Any, output: Any) -> None:
    """Hand this worker's entropy measures to the scheduler on the step's ModelRunnerOutput
    (patch kv-compaction-reports); kept for the next output when this one is vLLM's shared empty
    output or not a ModelRunnerOutput."""
    state: WorkerKV | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None or not state.reports:
        return
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

    if type(output) is not ModelRunnerOutput or output is EMPTY_MODEL_RUNNER_OUTPUT:
        return
    setattr(output, REPORT_ATTRIBUTE, dict(state.reports))
    state.reports.clear()


def defer(state: WorkerKV, req_id: str, compaction: Compaction, layers: list[CacheLayer], ids: torch.Tensor,
          keep_blocks: int, block_size: int) -> DeferredCompaction:
    """Copy the request's blocks of every layer (with room for this step's token) and the plan
    of its in-layer compaction."""
    physical = compaction.physical
    blocks = cdiv(physical + 1, block_size)
    scratch = []
    for layer in layers:
        copy = layer.cache.new_zeros((blocks, *layer.cache.shape[1:]))
        copy[: ids.numel()] = layer.cache.index_select(0, ids)
        scratch.append(copy)
    window = state.observe.get(req_id, 1)
    fresh = physical - state.kept_at.get(req_id, 0)  # cached tokens appended since its last compaction
    return DeferredCompaction(req_id, compaction, layers, scratch, ids[:keep_blocks].clone(), block_size,
                              min(window, fresh + 1), state)


def compact_in_layer(layer: Any, query: torch.Tensor, key: torch.Tensor) -> None:
    """Run this step's deferred compactions for the cache of attention layer `layer` (called by
    the kv-compaction-queries patch after `record_queries`, before vLLM's attention; this
    step's keys and values are already in the cache, at the compacted slots): score the
    request's tokens with its window (its recorded queries and the step's own, against the
    copied keys and the step's key), select, and write the kept tokens into its first slots.
    A scoring failure falls back to the streaming selection for the rest of the request's
    layers (logged, counted as degraded)."""
    name = getattr(layer, "layer_name", None)
    for deferred in _DEFERRED:
        index = deferred.by_layer.get(name)
        if index is None or name in deferred.done or deferred.row < 0:
            continue
        compaction = deferred.compaction
        kept = None
        if not deferred.streaming:
            try:
                kept = deferred_selection(deferred, index, query, key)
            except Exception as e:  # noqa: BLE001 - never into the forward pass
                deferred.streaming = True
                logger.warning("vllm-adaptive: KV compaction of request %s fell back from %s to the "
                               "streaming selection: %s", deferred.req_id, compaction.policy, e)
        if kept is None:
            kept = streaming_selection(compaction, deferred.scratch[index].shape[1], deferred.scratch[index].device)
        write_kept(deferred, index, kept)
        deferred.done.add(name)
        if len(deferred.done) == len(deferred.layers):
            state = deferred.state
            if deferred.streaming:
                state.degraded += 1
            else:
                state.scored += 1
            if state.publisher is not None:
                state.publisher.touch()


def deferred_selection(deferred: DeferredCompaction, index: int, query: torch.Tensor,
                       key: torch.Tensor) -> torch.Tensor:
    """The kept tokens [KV heads, keep] of cache layer `index`: SnapKV over the window that ends
    with the step's own query (the step's key appended after the copied ones, so that its
    softmax, like every window row's, covers the keys up to its own)."""
    compaction, layer = deferred.compaction, deferred.layers[index]
    ring = deferred.state.rings.get(deferred.req_id)
    if ring is None:
        raise RuntimeError("no queries were recorded for it (is the attention backend vLLM's CPU one?)")
    wanted = torch.arange(deferred.position - deferred.count + 1, deferred.position + 1)
    slots = wanted % ring.window
    if wanted[0] < 0 or not torch.equal(ring.positions[slots], wanted):
        raise RuntimeError(f"its ring does not hold its last {deferred.count} queries")
    queries = ring.queries[layer.index].index_select(0, slots.to(ring.queries.device))
    scratch_key, _ = kv_views(deferred.scratch[index], "cpu")
    physical, size = compaction.physical, deferred.block_size
    heads, head_size = scratch_key.shape[1], scratch_key.shape[3]
    scratch_key[physical // size, :, physical % size] = key[deferred.row].reshape(heads, head_size)
    blocks = torch.arange(scratch_key.shape[0], dtype=torch.int64)
    mass = window_attention_mass(queries, scratch_key, blocks, physical + 1, layer.scale)
    scores = pool_scores(mass[:, :physical], POOL_KERNEL, POOLING)
    return select_tokens(scores, physical, compaction.keep, compaction.sinks, compaction.recent)


def write_kept(deferred: DeferredCompaction, index: int, kept: torch.Tensor) -> None:
    """Write the copied tokens `kept` [KV heads, keep] of cache layer `index` into the request's
    first `keep` slots (its kept blocks, in order)."""
    scratch_key, scratch_value = kv_views(deferred.scratch[index], "cpu")
    key, value = kv_views(deferred.layers[index].cache, "cpu")
    keep = kept.shape[1]
    heads = torch.arange(kept.shape[0])[:, None]
    slots = torch.arange(keep)
    blocks = deferred.kept_blocks[slots // deferred.block_size][None, :]
    offsets = (slots % deferred.block_size)[None, :]
    source_blocks, source_offsets = kept // deferred.block_size, kept % deferred.block_size
    key[blocks, heads, offsets] = scratch_key[source_blocks, heads, source_offsets]
    value[blocks, heads, offsets] = scratch_value[source_blocks, heads, source_offsets]


def window_queries(state: WorkerKV, req_id: str, physical: int) -> torch.Tensor:
    """The queries [layers, k, q_heads, head_size] of the request's last k tokens, the most the
    ring holds since its last compaction, in position order; raises when there are none."""
    ring = state.rings.get(req_id)
    if ring is None:
        raise RuntimeError("no queries were recorded for it (is the attention backend vLLM's CPU one?)")
    fresh = physical - state.kept_at.get(req_id, 0)  # tokens appended since its last compaction
    count = min(ring.window, fresh)
    last = int(ring.positions.max())
    wanted = torch.arange(last - count + 1, last + 1)
    slots = wanted % ring.window
    if count < 1 or last - count + 1 < 0 or not torch.equal(ring.positions[slots], wanted):
        raise RuntimeError(f"its ring does not hold its last {count} queries")
    return ring.queries.index_select(1, slots.to(ring.queries.device))


def record_queries(layer: Any, query: torch.Tensor, kv_cache: torch.Tensor | None = None) -> None:
    """Copy this step's observed rows of `query` (one attention layer's post-RoPE queries
    [tokens, q_heads, head_size] or [tokens, q_heads * head_size]) into their rings, and add
    the attention mass of accumulating requests' rows over their keys in `kv_cache` (this
    step's keys are already written); called by the kv-compaction-queries patch on every
    attention forward."""
    capture = _CAPTURE
    if capture is None:
        return
    index = capture.layer_index.get(getattr(layer, "layer_name", None))
    if index is None or query.shape[0] < capture.tokens:
        return
    q = query.reshape(query.shape[0], -1, capture.head_size)
    for ring, rows, slots, positions in capture.rows:
        ring.queries[index].index_copy_(0, slots, q.index_select(0, rows).to(ring.queries.dtype))
        if index == 0:
            ring.positions.index_copy_(0, slots.cpu(), positions)
    if capture.accumulate:
        if kv_cache is None:
            raise RuntimeError("accumulating attention mass needs the layer's KV cache")
        key, _ = kv_views(kv_cache, "cpu" if kv_cache.device.type == "cpu" else "flash")
        scale = float(layer.impl.scale)
        for mass, rows, ids, length in capture.accumulate:
            window_attention_mass(q.index_select(0, rows), key, ids, length, scale, out=mass[index, :, :length])


def stop_capture() -> None:
    """No more recording this step (after a failure in `record_queries`): the rings of this
    step's requests miss these positions, so their scored compactions degrade to streaming."""
    global _CAPTURE
    capture, _CAPTURE = _CAPTURE, None
    for ring, _, slots, _ in capture.rows if capture is not None else ():
        ring.positions[slots.cpu()] = -1  # layer 0 may have recorded them: not all layers did
    for mass, *_ in capture.accumulate if capture is not None else ():
        mass.fill_(float("nan"))  # some layers added this step's mass, others did not


def plan_capture(runner: Any, state: WorkerKV, total: int) -> StepCapture | None:
    """This step's rows of the observed requests (their last `window` tokens each)."""
    batch = runner.input_batch
    starts = runner.query_start_loc.np
    names = runner.kv_cache_config.kv_cache_groups[0].layer_names
    layer = runner.compilation_config.static_forward_context[names[0]]
    heads, head_size = int(layer.impl.num_heads), int(layer.impl.head_size)
    device = runner.device
    rows = []
    for req_id, window in state.observe.items():
        row = batch.req_id_to_index.get(req_id)
        if row is None or row >= batch.num_reqs:
            continue
        start, end = int(starts[row]), int(starts[row + 1])
        count = min(end - start, window)
        if count <= 0:
            continue
        ring = state.rings.get(req_id)
        if ring is None or ring.window != window:
            ring = state.rings[req_id] = QueryRing(
                torch.zeros(len(names), window, heads, head_size, dtype=torch.float32, device=device),
                torch.full((window,), -1, dtype=torch.int64))
        first = int(batch.num_computed_tokens_cpu[row]) + (end - start) - count
        positions = torch.arange(first, first + count, dtype=torch.int64)
        rows.append((ring, torch.arange(end - count, end, device=device), (positions % window).to(device),
                     positions))
    accumulate = []
    for req_id in state.accumulate:
        row = batch.req_id_to_index.get(req_id)
        if row is None or row >= batch.num_reqs:
            continue
        start, end = int(starts[row]), int(starts[row + 1])
        if end <= start:
            continue
        length = int(batch.num_computed_tokens_cpu[row]) + (end - start) - state.offsets.get(req_id, 0)
        (block_ids,) = runner.requests[req_id].block_ids
        num_kv_heads = int(layer.impl.num_kv_heads)
        mass = state.mass.get(req_id)
        if mass is None or mass.shape[2] < length:
            grown = torch.zeros(len(names), num_kv_heads, max(length, 2 * (0 if mass is None else mass.shape[2])),
                                dtype=torch.float32, device=device)
            if mass is not None:
                grown[:, :, : mass.shape[2]] = mass
            mass = state.mass[req_id] = grown
        accumulate.append((mass, torch.arange(start, end, device=device),
                           torch.tensor(block_ids, dtype=torch.int64, device=device), length))
    if not rows and not accumulate:
        return None
    return StepCapture({name: i for i, name in enumerate(names)}, head_size, total, rows, accumulate)


def place_deferred(runner: Any, pending: list[DeferredCompaction]) -> list[DeferredCompaction]:
    """This step's token (row in the flattened batch, logical position) of each deferred
    compaction; one that has none is written now with the streaming selection."""
    batch = runner.input_batch
    starts = runner.query_start_loc.np
    placed = []
    for deferred in pending:
        row = batch.req_id_to_index.get(deferred.req_id)
        if row is not None and row < batch.num_reqs and int(starts[row + 1]) - int(starts[row]) == 1:
            deferred.row = int(starts[row])
            deferred.position = int(batch.num_computed_tokens_cpu[row])
            placed.append(deferred)
            continue
        logger.warning("vllm-adaptive: request %s has no single token in this step: compacted with the "
                       "streaming selection", deferred.req_id)
        kept = streaming_selection(deferred.compaction, deferred.scratch[0].shape[1], deferred.scratch[0].device)
        for index in range(len(deferred.layers)):
            write_kept(deferred, index, kept)
        deferred.state.degraded += 1
        if deferred.state.publisher is not None:
            deferred.state.publisher.touch()
    return placed


def after_prepare_inputs(runner: Any, scheduler_output: Any) -> None:
    """Sequence lengths and KV slots of compacted rows from their physical length; this step's
    query rows to record."""
    global _CAPTURE, _DEFERRED
    state: WorkerKV | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None:
        return
    if state.observe or state.accumulate:
        _CAPTURE = plan_capture(runner, state, scheduler_output.total_num_scheduled_tokens)
    if state.pending:
        _DEFERRED = place_deferred(runner, state.pending)
        state.pending = []
    if not state.offsets:
        return
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    offsets = np.zeros(num_reqs, dtype=np.int64)
    for req_id, evicted in state.offsets.items():
        row = batch.req_id_to_index.get(req_id)
        if row is not None and row < num_reqs:
            offsets[row] = evicted
    if not offsets.any():
        return
    total = scheduler_output.total_num_scheduled_tokens
    shift = torch.from_numpy(offsets)
    runner.optimistic_seq_lens_cpu[:num_reqs] -= shift.to(runner.optimistic_seq_lens_cpu.dtype)
    device_shift = shift.to(runner.seq_lens.device)
    runner.seq_lens[:num_reqs] -= device_shift.to(runner.seq_lens.dtype)
    req_indices = runner.req_indices.gpu[:total].long()
    physical = runner.positions[:total] - device_shift[req_indices].to(runner.positions.dtype)
    batch.block_table.compute_slot_mapping(num_reqs, runner.query_start_loc.gpu[: num_reqs + 1], physical)
