"""Which vLLM settings KV compaction works with, checked at start-up.

Compaction moves a request's kept tokens inside its own blocks and gives the rest back to the
pool (vllm_adaptive.kvcache.scheduler, .worker). It needs, and refuses otherwise, naming the
setting:

- no speculative decoding: draft tokens and their rejections move the request's length in
  ways the eviction offsets do not follow yet;
- no other `scheduler_cls`: compaction is the scheduler;
- synchronous scheduling: the scheduler frees blocks that the worker's compaction of the same
  step must read first (turned off for you when not chosen; vLLM's CPU engine is synchronous);
- one pipeline stage, no KV connector (LMCache, NIXL, offloading: they move blocks we rewrite);
- a KV cache dtype without per-token scales (`auto`): fp8/int8 scales would need moving too;
- on the resolved model (in the engine core): one KV cache group of full attention, no sliding
  window, no MLA, no ALiBi.

`check_engine_arguments` runs in `vllm_adaptive.engine_kwargs` (and so `--plugin adaptive`),
`check_vllm_config` in the engine core when the scheduler starts. Both raise a ConfigError that
starts "kvcache.enabled cannot run with these settings:".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_adaptive.errors import ConfigError

SCHEDULER_CLS = "vllm_adaptive.kvcache.scheduler.CompactingScheduler"


def _raise(found: list[str]) -> None:
    if found:
        raise ConfigError("kvcache.enabled cannot run with these settings: " + "; ".join(found)
                          + ". Change them, or set kvcache.enabled: false.")


def check_engine_arguments(speculative_config: Any, engine_args: Mapping[str, Any]) -> dict[str, Any]:
    """Check a deployment's engine arguments; returns the engine arguments to set."""
    found = []
    if speculative_config:
        found.append("speculative_config is set: KV compaction does not run with speculative decoding yet")
    if engine_args.get("scheduler_cls") not in (None, SCHEDULER_CLS):
        found.append(f"scheduler_cls is {engine_args['scheduler_cls']!r}: KV compaction runs its own scheduler")
    if engine_args.get("async_scheduling"):
        found.append("async_scheduling is true: compaction needs each step's scheduling and execution in order")
    if (engine_args.get("pipeline_parallel_size") or 1) > 1:
        found.append("pipeline_parallel_size > 1: compaction runs with one pipeline stage")
    if engine_args.get("kv_transfer_config"):
        found.append("kv_transfer_config is set: a KV connector moves blocks that compaction rewrites")
    if engine_args.get("kv_cache_dtype", "auto") not in ("auto", None):
        found.append(f"kv_cache_dtype is {engine_args['kv_cache_dtype']!r}: compaction moves "
                     "unscaled caches only (use 'auto')")
    _raise(found)
    return {"scheduler_cls": SCHEDULER_CLS, "async_scheduling": False}


def check_vllm_config(vllm_config: Any, kv_cache_config: Any) -> None:
    """Check an engine's resolved configuration (in the engine core); raises ConfigError."""
    found = []
    if vllm_config.speculative_config is not None:
        found.append("speculative_config is set: KV compaction does not run with speculative decoding yet")
    if vllm_config.scheduler_config.async_scheduling:
        found.append("async_scheduling is on: compaction needs each step's scheduling and execution in order")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        found.append("pipeline_parallel_size > 1: compaction runs with one pipeline stage")
    if vllm_config.kv_transfer_config is not None:
        found.append("kv_transfer_config is set: a KV connector moves blocks that compaction rewrites")
    if vllm_config.cache_config.cache_dtype not in ("auto",):
        found.append(f"kv_cache_dtype is {vllm_config.cache_config.cache_dtype!r}: compaction moves "
                     "unscaled caches only (use 'auto')")
    model = vllm_config.model_config
    if getattr(model, "use_mla", False):
        found.append("the model uses MLA: its latent cache has no per-head tokens to select")
    if model.get_sliding_window() is not None:
        found.append("the model uses sliding-window attention: its blocks are freed by vLLM already")
    if "alibi" in str(getattr(model.hf_config, "position_embedding_type", "")).lower() or getattr(
            model.hf_config, "alibi", False):
        found.append("the model uses ALiBi: attention biases depend on distances that compaction changes")
    found += _cpu_kernel_problems(vllm_config, kv_cache_config)
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        found.append(f"the model has {len(groups)} KV cache groups: compaction supports one")
    else:
        from vllm.v1.kv_cache_interface import FullAttentionSpec

        spec = groups[0].kv_cache_spec
        if type(spec) is not FullAttentionSpec:
            found.append(f"the KV cache is {type(spec).__name__}: compaction supports full attention")
    _raise(found)


def _cpu_kernel_problems(vllm_config: Any, kv_cache_config: Any) -> list[str]:
    """On CPU: the attention kernel must be one whose cache layout compaction knows ("vec",
    "vec16": pinned by tests/contract/kv_compaction_probe_cases.py); "amx" packs keys otherwise."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or not kv_cache_config.kv_cache_groups:
        return []
    if vllm_config.cache_config.cache_dtype != "auto":
        return []  # refused already, and the kernel choice may fail for it
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    try:
        isa = _get_attn_isa(vllm_config.model_config.dtype, spec.block_size, getattr(spec, "head_size", None),
                            vllm_config.cache_config.cache_dtype)
    except Exception as e:  # noqa: BLE001 - vLLM's own refusal, reported as a setting
        return [f"the CPU attention kernel cannot be chosen ({e})"]
    if isa in ("vec", "vec16"):
        return []
    return [f"the CPU attention kernel is {isa!r}: compaction knows the cache layout of 'vec' and 'vec16' "
            "only (on AMX CPUs, serve in float32 to use 'vec')"]
