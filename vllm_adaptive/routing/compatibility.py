"""Which vLLM settings Entropy Adaptive Decoding (EAD) works with, checked at start-up.

EAD runs inside the project's draft-model proposer on the V1 model runner (the proposer patch,
patches/gpu_model_runner_draft_model_proposer.py) and marks the positions whose draft tokens
the rejection sampler accepts unverified. It needs what adaptive drafting needs
(vllm_adaptive.speculative.compatibility: method 'draft_model', the padded drafter batch, the
draft's full logits on one rank, no parallel drafting, standard rejection sampling, synchronous
scheduling, the V1 model runner, one rank), worded for EAD, and besides:

- any `num_speculative_tokens` >= 1: it is the draft length K of every request, routed or not;
- no `num_speculative_tokens_per_batch_size`: that table may set K to 0 for large batches, and
  with K = 0 vLLM returns before the draft model computes the entropy EAD routes on.

`check_engine_arguments` runs in `vllm_adaptive.engine_kwargs` (and so `--plugin adaptive`),
`check_vllm_config` in the worker on the resolved config. Both raise a ConfigError that starts
"routing.enabled (EAD) cannot run with these settings:" and names every setting to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_adaptive.errors import ConfigError
from vllm_adaptive.routing.config import RoutingConfig
from vllm_adaptive.speculative.compatibility import (
    ProposerNeeds,
    engine_settings,
    method_problems,
    resolved_settings,
    runner_problems,
)

# K when the deployment's speculative config does not say (`make serve DRAFT_MODEL=draft`): the
# draft length of non-EAD requests and of speculative-mode EAD drafts, and faithful mode's cap.
DEFAULT_DRAFT_TOKENS = 4

_EAD = ProposerNeeds(
    method_why="EAD routes inside vLLM's draft-model proposer only",
    flags_off={
        "disable_padded_drafter_batch": "the EAD proposer reads acceptances from the padded batch",
        "use_local_argmax_reduction": "EAD needs the draft's full logits for its entropy",
        "use_heterogeneous_vocab": (
            "EAD needs the draft's full logits in the target's vocabulary (its accepted draft "
            "tokens are target tokens)"
        ),
        "parallel_drafting": "parallel drafting has no per-token draft step to route on",
    },
    parallel_why="EAD's routing state lives in one worker process",
    feature="EAD",
)
_PER_BATCH_SIZE = "num_speculative_tokens_per_batch_size"
_KEYS = ("method", "num_speculative_tokens", "rejection_sample_method", _PER_BATCH_SIZE,
         *_EAD.flags_off)


def problems(settings: Mapping[str, Any]) -> list[str]:
    """What in `settings` (as in vllm_adaptive.speculative.compatibility.problems, plus
    num_speculative_tokens_per_batch_size) stops EAD, one sentence each naming the setting."""
    found = method_problems(_EAD, settings)
    k = settings.get("num_speculative_tokens")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        found.append(
            f"speculative_config num_speculative_tokens must be an integer >= 1 (got {k!r}): "
            "it is the draft length of every request"
        )
    if settings.get(_PER_BATCH_SIZE) is not None:
        found.append(
            f"speculative_config {_PER_BATCH_SIZE} must be unset: it may set the draft length "
            "to 0, and with no draft step there is no entropy to route on"
        )
    return found + runner_problems(_EAD, settings)


def _raise(found: list[str]) -> None:
    if found:
        raise ConfigError(
            "routing.enabled (EAD) cannot run with these settings: "
            + "; ".join(found)
            + ". Change them, or set routing.enabled: false."
        )


def check_engine_arguments(
    config: RoutingConfig, speculative_config: Any, engine_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Check a deployment's engine arguments; returns the engine arguments to set.

    `speculative_config`: what the deployment passes to vLLM (a dict, or a SpeculativeConfig),
    returned unchanged except that a dict without num_speculative_tokens gets
    DEFAULT_DRAFT_TOKENS. Async scheduling, when not chosen, is turned off (vLLM would turn it on
    for draft models on GPU). No `config` field constrains vLLM's settings so far; it is taken
    so that the callers need not change when one does.
    """
    if not speculative_config:
        _raise([
            "speculative_config is not set: EAD needs vLLM's draft-model speculation; pass "
            '--speculative-config \'{"method": "draft_model", "model": DRAFT_MODEL, '
            '"num_speculative_tokens": K}\' (offline: speculative_config={...})'
        ])
    if isinstance(speculative_config, Mapping) and speculative_config.get("num_speculative_tokens") is None:
        speculative_config = {**speculative_config, "num_speculative_tokens": DEFAULT_DRAFT_TOKENS}
    _raise(problems(engine_settings(speculative_config, engine_args, _KEYS)))
    return {"speculative_config": speculative_config, "async_scheduling": False}


def check_vllm_config(config: RoutingConfig, vllm_config: Any) -> None:
    """Check the resolved VllmConfig of an engine (in its worker); raises ConfigError."""
    if vllm_config.speculative_config is None:
        _raise(["speculative_config is not set: EAD needs vLLM's draft-model speculation"])
    _raise(problems(resolved_settings(vllm_config, _KEYS)))
