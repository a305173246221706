"""Which vLLM settings adaptive draft length works with, checked at start-up.

Adaptive drafting replaces vLLM's draft-model proposer on the V1 model runner
(patches/gpu_model_runner_draft_model_proposer.py) and returns drafts of different lengths per
request. That holds only for some settings (docs/dev/spec_decode_research.md):

- `method: "draft_model"`: the only proposer replaced;
- `num_speculative_tokens` equal to `speculative.max_draft_tokens` (it sizes vLLM's buffers);
- synchronous scheduling: async scheduling pads every draft to the scheduled length;
- padded drafter batch, full draft logits on one rank (no local argmax reduction, no
  heterogeneous vocabularies), no parallel drafting, standard rejection sampling;
- the V1 model runner (Model Runner V2 builds its own speculator, which the patch does not reach);
- one rank (TP = PP = DP = 1): early exit and the controller decide per rank.

`check_engine_arguments` runs where the deployment's arguments are turned into engine arguments
(`vllm_adaptive.engine_kwargs`, `--plugin adaptive`), and `check_vllm_config` in the worker on
the resolved config, so a setting vLLM changes on its own is caught too. Both raise a
ConfigError that names every setting to change. EAD (vllm_adaptive.routing.compatibility) runs
on the same proposer and shares every check but K's, worded by its own `ProposerNeeds`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vllm_adaptive.errors import ConfigError
from vllm_adaptive.speculative.config import AdaptiveDraftConfig

# The speculative-config flags that must stay off, and why.
_FLAGS_OFF = {
    "disable_padded_drafter_batch": "the adaptive proposer reads acceptances from the padded batch",
    "use_local_argmax_reduction": "stop rules need the draft's full logits",
    "use_heterogeneous_vocab": "stop rules need the draft's full logits in the target's vocabulary",
    "parallel_drafting": "parallel drafting has no draft loop to stop",
}
PARALLEL_SIZES = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def _read(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


@dataclasses.dataclass(frozen=True)
class ProposerNeeds:
    """What a feature built on the patched draft-model proposer says about each shared setting.

    `method_why`: why it needs method 'draft_model'; `flags_off`: each speculative-config flag
    that must stay off, and why; `parallel_why`: why the parallel sizes must be 1; `feature`:
    how the model-runner sentence names it.
    """

    method_why: str
    flags_off: Mapping[str, str]
    parallel_why: str
    feature: str


_ADAPTIVE_DRAFTING = ProposerNeeds(
    method_why="adaptive draft length replaces vLLM's draft-model proposer only",
    flags_off=_FLAGS_OFF,
    parallel_why="ranks would stop their drafts apart",
    feature="adaptive drafting",
)


def method_problems(needs: ProposerNeeds, settings: Mapping[str, Any]) -> list[str]:
    """The method must be 'draft_model'."""
    method = settings.get("method")
    if method != "draft_model":
        return [
            f"speculative_config method must be 'draft_model' (got {method!r}): {needs.method_why}"
        ]
    return []


def runner_problems(needs: ProposerNeeds, settings: Mapping[str, Any]) -> list[str]:
    """The flags, rejection sampling, scheduling, parallel sizes and model runner the patched
    proposer needs (everything after the method and K), one sentence each."""
    found = []
    for flag, why in needs.flags_off.items():
        if settings.get(flag):
            found.append(f"speculative_config {flag} must be off: {why}")
    rejection = settings.get("rejection_sample_method")
    if rejection not in (None, "standard"):
        found.append(
            f"speculative_config rejection_sample_method must be 'standard' (got {rejection!r})"
        )
    if settings.get("async_scheduling"):
        found.append(
            "async scheduling must be off (--no-async-scheduling, offline async_scheduling=False): "
            "it pads every draft to the scheduled length"
        )
    for name in PARALLEL_SIZES:
        size = settings.get(name)
        if size is not None and size > 1:
            found.append(f"{name} must be 1 (got {size}): {needs.parallel_why}")
    v2 = settings.get("model_runner_v2")
    if v2 is None or v2:
        found.append(
            f"{needs.feature} runs on the V1 model runner only: set VLLM_USE_V2_MODEL_RUNNER=0"
            + (" (it is set to 1)" if v2 else " (Model Runner V2 is the default on this platform)")
        )
    return found


def problems(config: AdaptiveDraftConfig, settings: Mapping[str, Any]) -> list[str]:
    """What in `settings` (the speculative-config fields above, async_scheduling, the parallel
    sizes and `model_runner_v2`: True, False or None for "not known to be off") stops adaptive
    drafting, one sentence each naming the setting to change."""
    found = method_problems(_ADAPTIVE_DRAFTING, settings)
    k = settings.get("num_speculative_tokens")
    if k != config.max_draft_tokens:
        found.append(
            f"speculative_config num_speculative_tokens ({k!r}) must equal "
            f"speculative.max_draft_tokens ({config.max_draft_tokens}); set one to the other"
        )
    return found + runner_problems(_ADAPTIVE_DRAFTING, settings)


def _raise(found: list[str]) -> None:
    if found:
        raise ConfigError(
            "speculative.enabled (adaptive draft length) cannot run with these settings: "
            + "; ".join(found)
            + ". Change them, or set speculative.enabled: false."
        )


def model_runner_v2_from_environment() -> bool | None:
    """Whether workers will run Model Runner V2: VLLM_USE_V2_MODEL_RUNNER when set, else False
    on CPU and None ("not known to be off") elsewhere."""
    import vllm.envs as envs
    from vllm.platforms import current_platform

    chosen = envs.VLLM_USE_V2_MODEL_RUNNER
    if chosen is not None:
        return bool(chosen)
    # vLLM picks V2 by default only where Triton runs; the CPU build has none.
    return False if current_platform.is_cpu() else None


def engine_settings(
    speculative_config: Any, engine_args: Mapping[str, Any], keys: tuple[str, ...]
) -> dict[str, Any]:
    """The settings `problems` reads, from a deployment's engine arguments (before vLLM
    resolves them); `keys`: the speculative-config fields to read."""
    settings = {key: _read(speculative_config, key) for key in keys}
    settings["async_scheduling"] = engine_args.get("async_scheduling")
    settings.update({name: engine_args.get(name) for name in PARALLEL_SIZES})
    settings["model_runner_v2"] = model_runner_v2_from_environment()
    return settings


def resolved_settings(vllm_config: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The settings `problems` reads, from an engine's resolved VllmConfig."""
    spec = vllm_config.speculative_config
    settings = {key: _read(spec, key) for key in keys}
    settings["async_scheduling"] = vllm_config.scheduler_config.async_scheduling
    settings.update({name: _read(vllm_config.parallel_config, name) for name in PARALLEL_SIZES})
    settings["model_runner_v2"] = bool(vllm_config.use_v2_model_runner)
    return settings


_KEYS = ("method", "num_speculative_tokens", "rejection_sample_method", *_FLAGS_OFF)


def check_engine_arguments(
    config: AdaptiveDraftConfig, speculative_config: Any, engine_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Check a deployment's engine arguments; returns the engine arguments to set.

    `speculative_config`: what the deployment passes to vLLM (a dict, or a SpeculativeConfig).
    A missing num_speculative_tokens is filled with max_draft_tokens; async scheduling, when not
    chosen, is turned off (vLLM would turn it on for draft models on GPU).
    """
    if not speculative_config:
        raise ConfigError(
            "speculative.enabled (adaptive draft length) needs vLLM's draft-model speculation: "
            'pass --speculative-config \'{"method": "draft_model", "model": DRAFT_MODEL, '
            f'"num_speculative_tokens": {config.max_draft_tokens}}}\' (offline: '
            "speculative_config={...}), or set speculative.enabled: false"
        )
    given_k = _read(speculative_config, "num_speculative_tokens")
    if isinstance(speculative_config, Mapping) and given_k is None:
        speculative_config = {**speculative_config,
                              "num_speculative_tokens": config.max_draft_tokens}
    _raise(problems(config, engine_settings(speculative_config, engine_args, _KEYS)))
    return {"speculative_config": speculative_config, "async_scheduling": False}


def check_vllm_config(config: AdaptiveDraftConfig, vllm_config: Any) -> None:
    """Check the resolved VllmConfig of an engine (in its worker); raises ConfigError."""
    _raise(problems(config, resolved_settings(vllm_config, _KEYS)))
