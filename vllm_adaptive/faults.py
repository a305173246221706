"""Fault injection: make a named plugin path inside vLLM fail on purpose, to test its fallback.

Off unless the environment variable VLLM_ADAPTIVE_FAULT_INJECT names fault points, comma-separated
(`VLLM_ADAPTIVE_FAULT_INJECT=spec:stop_rule,spec:feedback`). At a named point the plugin raises
`InjectedFault` where the real code could fail; the code around it must then degrade the affected
requests, count and log, as it does for any other failure. The engine's processes inherit the
variable; each reads it once (`injected_faults`, cached). A component with fault points calls
`injected_faults()` when it is built, so that a misspelt name stops the engine at start-up
rather than failing later inside a fallback. Tests that switch faults inside a running worker
set the variable there and call `injected_faults.cache_clear()`.
"""

from __future__ import annotations

import functools
import os

from vllm_adaptive.errors import ConfigError

FAULT_INJECT_ENV = "VLLM_ADAPTIVE_FAULT_INJECT"

# Every fault point: name -> where it fails. A new point is one line here.
FAULT_POINTS: dict[str, str] = {
    "spec:feedback": "adaptive drafting, learning from the verification of the previous drafts",
    "spec:controller": "adaptive drafting, choosing the step's draft-length cap K",
    "spec:stop_rule": "adaptive drafting, the stop rule at a draft step",
    "spec:finish": "adaptive drafting, collecting the step's drafts and timings",
    "sampler:update_state": "adaptive sampling, admitting a request that chose a sampler "
    "(V1 update_state, MRV2 add_request)",
    "sampler:apply": "adaptive sampling, a sampler's step on its requests' logits rows",
    "routing:gate": "EAD routing, forcing the planned positions at verification",
    "routing:commit": "EAD routing, learning what the previous step's verification emitted",
    "routing:draft": "EAD routing, the switching machine at a draft step",
    "routing:finish": "EAD routing, building the step's drafts and plan",
}


class InjectedFault(RuntimeError):
    """The failure a named fault point raises when VLLM_ADAPTIVE_FAULT_INJECT names it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"fault injected at {name!r} ({FAULT_INJECT_ENV})")
        self.name = name


@functools.cache
def injected_faults() -> frozenset[str]:
    """The fault points VLLM_ADAPTIVE_FAULT_INJECT names (read once per process)."""
    raw = os.environ.get(FAULT_INJECT_ENV, "")
    names = frozenset(name.strip() for name in raw.split(",") if name.strip())
    unknown = sorted(names - FAULT_POINTS.keys())
    if unknown:
        raise ConfigError(
            f"{FAULT_INJECT_ENV}: unknown fault point(s) {unknown}; known: {sorted(FAULT_POINTS)} "
            f"(got {raw!r}; unset it to inject nothing)"
        )
    return names


def fault_injected(name: str) -> bool:
    """Whether the fault point `name` (a key of FAULT_POINTS) should fail in this process."""
    if name not in FAULT_POINTS:
        raise ValueError(f"{name!r} is not a fault point; known: {sorted(FAULT_POINTS)}")
    return name in injected_faults()


def raise_if_injected(name: str) -> None:
    """Raise `InjectedFault(name)` when the fault point `name` is injected."""
    if fault_injected(name):
        raise InjectedFault(name)
