"""Patch: vLLM's CPU attention hands each step's queries to KV compaction's query rings.

Why: a SnapKV compaction (issue #18, vllm_adaptive.kvcache) keeps the tokens that a request's
last `window` queries attend to. vLLM keeps no query after the attention op, and an
`nn.Module` forward hook on the Attention layer is traced once by torch.compile on CPU (it would
not run per step).

How: wrap `CPUAttentionBackendImpl.forward` (a class attribute, set once). vLLM registers
attention as an opaque custom op (`unified_attention_with_output`), which calls
`self.impl.forward(layer, query, ...)` eagerly at every step with the post-RoPE queries
[tokens, q_heads, head_size]; before vLLM's method, `vllm_adaptive.kvcache.worker.record_queries`
copies the rows `after_prepare_inputs` listed for this step (nothing, after reading one module
global, when no request has a query-scored policy); then `compact_in_layer` runs this step's
SnapKV compactions for this layer (their window ends with the step's own query; see the worker's
docstring), before vLLM's attention reads the cache. A failure in the recording is logged and
stops it for the step; one in the compaction falls back to the streaming selection (logged,
counted): the attention itself always runs. Applied when
vllm.v1.attention.backends.cpu_attn is imported. Other backends (FlashAttention on GPU) are not
wrapped: a SnapKV compaction there falls back to the streaming selection, counted as degraded
(`IN_LAYER_HOOK`, set when the wrapper is made, tells the worker whether layers compact).

Removal plan: when vLLM's attention layer exposes the step's queries, or a scoring hook, to
plugins (sparse KV RFC, vLLM #5751; KVPress, #10491).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from ._class_method import ClassMethodPatch, original_of

BACKEND_MODULE = "vllm.v1.attention.backends.cpu_attn"
METHOD = "forward"

logger = logging.getLogger(__name__)


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    from vllm_adaptive.kvcache import worker

    @functools.wraps(original)
    def forward(self: Any, layer: Any, query: Any, key: Any, value: Any, kv_cache: Any, *args: Any,
                **kwargs: Any) -> Any:
        if worker._CAPTURE is not None:
            try:
                worker.record_queries(layer, query, kv_cache)
            except Exception:  # noqa: BLE001 - never into the forward pass
                logger.exception("vllm-adaptive: recording queries for KV compaction failed; "
                                 "scored compactions of this step's requests fall back to streaming")
                worker.stop_capture()
        if worker._DEFERRED:
            try:
                worker.compact_in_layer(layer, query, key)
            except Exception:  # noqa: BLE001 - never into the forward pass
                logger.exception("vllm-adaptive: a KV compaction inside the attention layer failed")
        return original(self, layer, query, key, value, kv_cache, *args, **kwargs)

    worker.IN_LAYER_HOOK = True

    return forward


def check_contract() -> None:
    """What `record_queries` assumes about vLLM's attention (KV_COMPACTION.md §4 (a'))."""
    import importlib

    from vllm_adaptive.patches import PatchContractError

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise PatchContractError(message)

    module = importlib.import_module(BACKEND_MODULE)
    impl = module.CPUAttentionBackendImpl
    current = vars(impl).get(METHOD)
    require(current is not None, f"CPUAttentionBackendImpl has no {METHOD} any more")
    params = list(inspect.signature(original_of(current)).parameters)
    require(params[:6] == ["self", "layer", "query", "key", "value", "kv_cache"],
            f"CPUAttentionBackendImpl.{METHOD} parameters changed: {params}")
    attention = importlib.import_module("vllm.model_executor.layers.attention.attention")
    op = inspect.getsource(attention.unified_attention_with_output)
    require("self.impl.forward(" in op and "get_attention_context(layer_name)" in op,
            "unified_attention_with_output no longer calls the layer's impl.forward")
    init = inspect.getsource(attention.Attention.__init__)
    require("self.layer_name = prefix" in init, "Attention no longer keeps its layer_name")
    impl_init = inspect.getsource(impl.__init__)
    require(all(f"self.{name} = " in impl_init for name in ("num_heads", "head_size", "scale", "num_kv_heads")),
            "CPUAttentionBackendImpl no longer keeps num_heads, head_size, num_kv_heads and scale")


_patch = ClassMethodPatch(BACKEND_MODULE, "CPUAttentionBackendImpl", METHOD, _wrap, lambda: check_contract(), __name__)
rebind, apply, revert = _patch.rebind, _patch.apply, _patch.revert
