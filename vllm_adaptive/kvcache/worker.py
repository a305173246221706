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
from vllm_adaptive.kvcache.plan import PLAN_ATTRIBUTE, Compaction, KVPlan
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
    compactions: int = 0
    tokens_evicted: int = 0
    scored: int = 0  # compactions whose selection came from scores
    degraded: int = 0  # scored policies that fell back to streaming
    publisher: SnapshotPublisher | None = None

    def snapshot(self) -> dict[str, int]:
        return {"compactions": self.compactions, "scored": self.scored, "degraded": self.degraded}


# The runner state of this worker process whose step is recording queries (None: no recording).
_CAPTURE: StepCapture | None = None


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
    global _CAPTURE
    _CAPTURE = None  # the previous step's rows are not this step's
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
    for req_id, compaction in plan.compact.items():
        compact_request(runner, state, req_id, compaction)
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


def compact_request(runner: Any, state: WorkerKV, req_id: str, compaction: Compaction) -> None:
    """Move `req_id`'s kept tokens to its first slots in every layer, then cut its block ids."""
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
        streaming = torch.tensor(compaction.kept_tokens(), dtype=torch.int64, device=device)
        kept = [streaming.expand(key.shape[1], -1) for key, _ in views]
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
    keep_blocks = cdiv(compaction.keep, block_size)
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


def after_prepare_inputs(runner: Any, scheduler_output: Any) -> None:
    """Sequence lengths and KV slots of compacted rows from their physical length; this step's
    query rows to record."""
    global _CAPTURE
    state: WorkerKV | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None:
        return
    if state.observe or state.accumulate:
        _CAPTURE = plan_capture(runner, state, scheduler_output.total_num_scheduled_tokens)
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
