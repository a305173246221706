"""How the plugin switches itself on for one deployment, and nothing else.

`--plugin adaptive [--adaptive-config FILE]` (added to vLLM's parser by a patch) and the offline
`engine_kwargs()` both end in `engine_kwargs`: it validates the config and returns the two
public engine arguments that carry it, `additional_config["adaptive"]` (read by the engine core
and every worker) and our class appended to `logits_processors` (loaded by the workers, and used
by the API server to validate per-request arguments at admission). With `speculative.enabled`
it also checks the deployment's speculative config and engine arguments against what adaptive
draft length supports, fills `num_speculative_tokens` when absent and turns async scheduling
off (vllm_adaptive.speculative.compatibility); with `routing.enabled` (EAD) it checks them
against what EAD supports and turns async scheduling off (vllm_adaptive.routing.compatibility).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vllm_adaptive.config import ADDITIONAL_CONFIG_KEY, AdaptiveConfig, ConfigError

logger = logging.getLogger(__name__)

PLUGIN_NAME = "adaptive"
PROCESSOR_FQCN = "vllm_adaptive.sampling.processor:AdaptiveLogitsProcessor"

_lock = threading.Lock()
_registered = False
# The config of the deployment this process admits requests for (API server / offline LLM).
_frontend_config: AdaptiveConfig | None = None


class PluginUnavailableError(RuntimeError):
    """The installed vLLM does not match one of the plugin's patches; the message names it."""


def register_plugin() -> None:
    """Apply the general-plugin patches (all or none). Where vLLM does not match them, plain
    vLLM keeps working, and a command line that asks for the plugin stops here with the
    message that names the patch."""
    global _registered
    with _lock:
        if _registered:
            return
        from vllm_adaptive.patches import apply_patches

        found = apply_patches("general_plugin")
        _registered = True
    if found and asks_for_plugin(sys.argv):
        raise SystemExit(found[0].message())


def asks_for_plugin(argv: list[str]) -> bool:
    """Whether a command line opts in with `--plugin adaptive` (or `--plugin=adaptive`)."""
    for i, arg in enumerate(argv):
        if arg == "--plugin" and i + 1 < len(argv) and argv[i + 1] == PLUGIN_NAME:
            return True
        if arg == f"--plugin={PLUGIN_NAME}":
            return True
    return False


def check_available(speculative: bool = False) -> None:
    """Raise PluginUnavailableError when a patch the deployment needs was not applied.

    With `speculative` (adaptive drafting or EAD), the contracts of the patches checked in
    workers when they import vLLM's runner (the adaptive proposer's) are checked here too, so
    the deployment stops before its engine starts.
    """
    from vllm_adaptive.patches import PATCHES, failures, load, record_failure

    register_plugin()
    if speculative:
        for spec in PATCHES:
            if spec.contract_on_import:
                try:
                    load(spec).check_contract()
                except Exception as e:  # noqa: BLE001 - any mismatch
                    record_failure(spec, e)
    found = failures()
    if found:
        raise PluginUnavailableError(found[0].message())


def frontend_config() -> AdaptiveConfig | None:
    return _frontend_config


def load_config(config: AdaptiveConfig | Mapping[str, Any] | str | Path | None) -> AdaptiveConfig:
    if config is None:
        return AdaptiveConfig()
    if isinstance(config, AdaptiveConfig):
        return config
    if isinstance(config, Mapping):
        return AdaptiveConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return AdaptiveConfig.from_file(config)
    raise ConfigError(f"adaptive config must be a path, a mapping or an AdaptiveConfig, got {config!r}")


def engine_kwargs(
    config: AdaptiveConfig | Mapping[str, Any] | str | Path | None = None,
    *,
    additional_config: Mapping[str, Any] | None = None,
    logits_processors: list[Any] | None = None,
    speculative_config: Any = None,
    **other: Any,
) -> dict[str, Any]:
    """Engine arguments that turn the plugin on; other engine arguments pass through."""
    global _frontend_config
    adaptive = load_config(config)
    # EAD (routing) runs in the same proposer patch as adaptive drafting.
    check_available(speculative=adaptive.speculative.enabled or adaptive.routing.enabled
                    or adaptive.kvcache.enabled)
    merged_additional = dict(additional_config or {})
    merged_additional[ADDITIONAL_CONFIG_KEY] = adaptive.to_dict()
    processors = list(logits_processors or [])
    if adaptive.speculative.enabled:
        from vllm_adaptive.speculative.compatibility import check_engine_arguments

        # Raises ConfigError naming every setting adaptive drafting cannot run with.
        settings = check_engine_arguments(adaptive.speculative, speculative_config, other)
        speculative_config = settings.pop("speculative_config")
        other.update(settings)
    if adaptive.routing.enabled:
        from vllm_adaptive.routing.compatibility import check_engine_arguments as check_routing

        # Raises ConfigError naming every setting EAD cannot run with.
        settings = check_routing(adaptive.routing, speculative_config, other)
        speculative_config = settings.pop("speculative_config")
        other.update(settings)
    if adaptive.kvcache.enabled:
        from vllm_adaptive.kvcache.compatibility import check_engine_arguments as check_kvcache

        # Raises ConfigError naming every setting KV compaction cannot run with.
        other.update(check_kvcache(speculative_config, other))
    if speculative_config:
        # vLLM's V1 runner refuses custom logits processors under speculative decoding.
        # Requests that name a sampler are refused at admission (patch spec-decode-admission).
        logger.warning(
            "vllm-adaptive: speculative decoding is configured, so per-request adaptive "
            "samplers are off for this deployment; requests naming adaptive_sampler get a "
            "validation error (HTTP 400)"
        )
        other["speculative_config"] = speculative_config
    elif PROCESSOR_FQCN not in processors:
        processors.append(PROCESSOR_FQCN)
    _frontend_config = adaptive
    return {**other, "additional_config": merged_additional, "logits_processors": processors}
