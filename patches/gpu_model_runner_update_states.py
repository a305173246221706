"""Patch: the V1 model runner runs KV compaction's plan before it updates its states.

Why: KV compaction (issue #18, vllm_adaptive.kvcache) frees a request's tail blocks in the
scheduler, before vLLM schedules, so that other requests of the same step can use them. The
kept tokens must reach the request's first slots before anything writes the freed blocks, and
the first thing that does is `GPUModelRunner._update_states` (which the CPU runner inherits): it
zeroes freshly allocated blocks, then appends each request's new block ids to its block table
row. vLLM has no hook there.

How: wrap `GPUModelRunner._update_states` (a class attribute, set once): the wrapper calls
`vllm_adaptive.kvcache.worker.before_update_states` (moves the kept tokens of the step's
compacted requests in every layer, cuts their block ids and block-table rows, keeps the
eviction offsets), then vLLM's method. Without a plan on the SchedulerOutput, which only
vllm_adaptive.kvcache.scheduler.CompactingScheduler attaches, the wrapper only reads one
attribute. Applied when vllm.v1.worker.gpu_model_runner is imported (a one-shot import hook).

Removal plan: when vLLM offers a KV-cache compaction or eviction hook in the model runner (the
sparse KV RFC, vLLM #5751), or a per-step pre-update callback.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from ._class_method import ClassMethodPatch, original_of

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
METHOD = "_update_states"


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    from vllm_adaptive.kvcache.worker import before_update_states

    @functools.wraps(original)
    def _update_states(self: Any, scheduler_output: Any) -> Any:
        before_update_states(self, scheduler_output)
        return original(self, scheduler_output)

    return _update_states


def check_contract() -> None:
    """What the plan's execution assumes about the runner (KV_COMPACTION.md §10, facts 8-10)."""
    import importlib

    from vllm.v1.worker.block_table import BlockTable
    from vllm.v1.worker.gpu_input_batch import CachedRequestState

    from vllm_adaptive.patches import PatchContractError

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise PatchContractError(message)

    module = importlib.import_module(RUNNER_MODULE)
    runner = module.GPUModelRunner
    current = vars(runner).get(METHOD)
    require(current is not None, f"GPUModelRunner has no {METHOD} any more")
    original = original_of(current)
    params = list(inspect.signature(original).parameters)
    require(params == ["self", "scheduler_output"], f"GPUModelRunner.{METHOD} parameters changed: {params}")
    source = inspect.getsource(original)
    zeroing = source.find("self._zero_block_ids(scheduler_output.new_block_ids_to_zero)")
    append = source.find("block_ids.extend(new_ids)")
    require(0 <= zeroing < append,
            f"GPUModelRunner.{METHOD} no longer zeroes new blocks first and then extends each "
            "request's block ids in place")
    require("self.input_batch.block_table.append_row(new_block_ids, req_index)" in source,
            f"GPUModelRunner.{METHOD} no longer appends new block ids to the block table rows")
    require("block_ids" in inspect.signature(CachedRequestState).parameters,
            "CachedRequestState has no block_ids any more")
    append_row = inspect.getsource(BlockTable.append_row)
    require("start = self.num_blocks_per_row[row_idx]" in append_row
            and "self.block_table.np[row_idx, start : start + num_blocks] = block_ids" in append_row,
            "BlockTable.append_row no longer writes from num_blocks_per_row[row] into block_table.np")
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    require("self.kv_cache = kv_cache" in inspect.getsource(AttentionLayerBase.bind_kv_cache),
            "attention layers no longer keep their cache tensor as layer.kv_cache")
    require(".bind_kv_cache(kv_cache)" in inspect.getsource(importlib.import_module(
                "vllm.v1.worker.utils").bind_kv_cache_to_layers),
            "the runner no longer binds each layer's cache in the forward context")


_patch = ClassMethodPatch(RUNNER_MODULE, "GPUModelRunner", METHOD, _wrap, lambda: check_contract(), __name__)
rebind, apply, revert = _patch.rebind, _patch.apply, _patch.revert
