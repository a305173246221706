"""Patch: the V1 model runner gives compacted requests their physical sequence lengths and slots.

Why: after KV compaction (issue #18, vllm_adaptive.kvcache) a request keeps its logical length
(token ids, positions for RoPE, `num_computed_tokens`) while its cache holds fewer tokens: E were
evicted. `GPUModelRunner._prepare_inputs` (inherited by the CPU runner) sets each row's
attention sequence length to num_computed_tokens + scheduled tokens and computes the new
tokens' KV slots from their positions, both logical. vLLM has no hook between the two.

How: wrap `GPUModelRunner._prepare_inputs` (a class attribute, set once): after vLLM's method,
`vllm_adaptive.kvcache.worker.after_prepare_inputs` lowers the compacted rows' `seq_lens` and
`optimistic_seq_lens_cpu` by E and recomputes the slot mapping from positions - E with vLLM's
own `compute_slot_mapping`; positions stay logical. Without compacted requests (every deployment
without compaction) the wrapper only reads one attribute. Applied when
vllm.v1.worker.gpu_model_runner is imported (a one-shot import hook).

Removal plan: when vLLM's runner takes per-request KV offsets (sparse KV RFC, vLLM #5751), or
offers a hook after the attention inputs are built.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from ._class_method import ClassMethodPatch, original_of

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
METHOD = "_prepare_inputs"


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    from vllm_adaptive.kvcache.worker import after_prepare_inputs

    @functools.wraps(original)
    def _prepare_inputs(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, scheduler_output, *args, **kwargs)
        after_prepare_inputs(self, scheduler_output)
        return result

    return _prepare_inputs


def check_contract() -> None:
    """What `after_prepare_inputs` assumes about the runner (KV_COMPACTION.md §10, fact 9)."""
    import importlib

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
    require(params[:2] == ["self", "scheduler_output"], f"GPUModelRunner.{METHOD} parameters changed: {params}")
    source = inspect.getsource(original)
    for needle, why in (
        ("self.seq_lens[:num_reqs] = (", "sets seq_lens elsewhere"),
        ("out=self.optimistic_seq_lens_cpu[:num_reqs]", "sets optimistic_seq_lens_cpu elsewhere"),
        ("self.req_indices.np[:total_num_scheduled_tokens] = req_indices", "no longer fills req_indices"),
        ("self.input_batch.block_table.compute_slot_mapping(", "no longer computes the slot mapping"),
        ("self.positions[:total_num_scheduled_tokens]", "no longer fills positions"),
    ):
        require(needle in source, f"GPUModelRunner.{METHOD} {why} ({needle!r} not found)")
    build = inspect.getsource(runner._build_attention_metadata)
    require("self.optimistic_seq_lens_cpu.numpy()[:num_reqs].max()" in build
            and "seq_lens=self.seq_lens[:num_reqs_padded]" in build,
            "GPUModelRunner._build_attention_metadata no longer takes seq_lens and max_seq_len "
            "from the buffers _prepare_inputs fills")


_patch = ClassMethodPatch(RUNNER_MODULE, "GPUModelRunner", METHOD, _wrap, lambda: check_contract(), __name__)
rebind, apply, revert = _patch.rebind, _patch.apply, _patch.revert
