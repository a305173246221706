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

Without a plan on the SchedulerOutput (every deployment without compaction) both functions
return at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from vllm_adaptive.kernels.kv_compact import compact_kv_, kv_views
from vllm_adaptive.kvcache.plan import PLAN_ATTRIBUTE, Compaction, KVPlan

# The attribute of the model runner that holds its compaction state.
STATE_ATTRIBUTE = "_vllm_adaptive_kv"


@dataclasses.dataclass
class WorkerKV:
    """One runner's compaction state: the eviction offset of each compacted request."""

    offsets: dict[str, int] = dataclasses.field(default_factory=dict)
    compactions: int = 0
    tokens_evicted: int = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def worker_state(runner: Any) -> WorkerKV:
    state = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None:
        state = WorkerKV()
        setattr(runner, STATE_ATTRIBUTE, state)
    return state


def before_update_states(runner: Any, scheduler_output: Any) -> None:
    """Run the step's plan (module docstring, 1-3); nothing without one."""
    plan: KVPlan | None = getattr(scheduler_output, PLAN_ATTRIBUTE, None)
    if plan is None:
        return
    state = worker_state(runner)
    for req_id, compaction in plan.compact.items():
        compact_request(runner, req_id, compaction)
        state.compactions += 1
        state.tokens_evicted += compaction.evicted
    state.offsets = dict(plan.evicted)


def layer_caches(runner: Any) -> list[torch.Tensor]:
    """The KV cache tensor of every attention layer (one per tensor, shared ones once)."""
    groups = runner.kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise RuntimeError(f"KV compaction needs one KV cache group, the model has {len(groups)}")
    context = runner.compilation_config.static_forward_context
    caches, seen = [], set()
    for name in groups[0].layer_names:
        cache = getattr(context.get(name), "kv_cache", None)
        if not isinstance(cache, torch.Tensor):
            raise RuntimeError(f"layer {name} has no KV cache tensor ({type(cache).__name__})")
        if cache.data_ptr() not in seen:
            seen.add(cache.data_ptr())
            caches.append(cache)
    return caches


def compact_request(runner: Any, req_id: str, compaction: Compaction) -> None:
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
    kept = torch.tensor(compaction.kept_tokens(), dtype=torch.int64, device=device)
    layout = "cpu" if device.type == "cpu" else "flash"
    for cache in layer_caches(runner):
        key, value = kv_views(cache, layout)
        compact_kv_(key, value, ids, kept.expand(key.shape[1], -1), check_indices=False)
    keep_blocks = cdiv(compaction.keep, block_size)
    del block_ids[keep_blocks:]
    row = runner.input_batch.req_id_to_index.get(req_id)
    if row is not None:
        table = runner.input_batch.block_table[0]
        before = int(table.num_blocks_per_row[row])
        table.block_table.np[row, keep_blocks:before] = 0
        table.num_blocks_per_row[row] = min(before, keep_blocks)


def after_prepare_inputs(runner: Any, scheduler_output: Any) -> None:
    """Sequence lengths and KV slots of compacted rows from their physical length."""
    state: WorkerKV | None = getattr(runner, STATE_ATTRIBUTE, None)
    if state is None or not state.offsets:
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
