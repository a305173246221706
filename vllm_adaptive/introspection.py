"""What the plugin looks like from inside a worker, for operators' debugging and for tests.

`LLM.collective_rpc(adaptive_worker_state)` runs `adaptive_worker_state` in every worker
(passing a callable needs VLLM_ALLOW_INSECURE_SERIALIZATION=1) and returns, per worker, the
config its AdaptiveLogitsProcessor was built with and its live counters (requests in the batch,
parked by preemption and resumed; sampler failures in all and by sampler and stage, the figures
a server shows as `vllm_adaptive:sampler_failures_total`), and, on engines that speculate with
vLLM's draft-model method, the state of the adaptive draft-model proposer (draft lengths,
acceptances, the controller's cap) and of EAD routing (tokens written by each model, switches,
target passes, forced and vetoed positions, failures).
"""

from __future__ import annotations

import os
from typing import Any

from vllm_adaptive.sampling.processor import AdaptiveLogitsProcessor


def find_processors(worker: Any) -> list[AdaptiveLogitsProcessor]:
    runner = getattr(worker, "model_runner", None)
    batch = getattr(runner, "input_batch", None)
    logitsprocs = getattr(batch, "logitsprocs", None)
    if logitsprocs is not None:  # V1 runner
        return [p for p in logitsprocs.all if isinstance(p, AdaptiveLogitsProcessor)]
    sampler = getattr(runner, "sampler", None)  # Model Runner V2
    return [p for p in getattr(sampler, "logits_processors", []) if isinstance(p, AdaptiveLogitsProcessor)]


def speculative_state(worker: Any) -> dict[str, Any] | None:
    """The adaptive proposer's state (`{"enabled": False}` when it behaves as vLLM's), or None
    when the worker's drafter is not ours (no speculation, another method, Model Runner V2)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    state = getattr(drafter, "adaptive_state", None)
    return state() if callable(state) else None


def routing_state(worker: Any) -> dict[str, Any] | None:
    """EAD routing's counters and config (vllm_adaptive.routing.policy), or None when the
    worker does not route (no `routing.enabled`, no draft-model speculation)."""
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    routing = getattr(drafter, "routing", None)
    return routing.snapshot() if routing is not None else None


def adaptive_worker_state(worker: Any) -> dict[str, Any]:
    processors = find_processors(worker)
    return {
        "pid": os.getpid(),
        "speculative": speculative_state(worker),
        "routing": routing_state(worker),
        "processors": [p.worker_state() for p in processors],
    }
