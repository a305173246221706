"""Per-request sampler arguments: the names requests may use, their ranges, and their parsing.

Requests choose a sampler with flat keys in `SamplingParams.extra_args` (over HTTP:
`vllm_xargs`), e.g. `{"adaptive_sampler": "mirostat_v2", "mirostat_tau": 3.0}`. Parsing happens
twice: at admission in the API server (`validate_params`, where a bad value becomes HTTP 400
naming the parameter, the allowed values and the value sent) and in the worker (where
deployment defaults fill what the request left out). Both read the sampler definitions
(vllm_adaptive.sampling.registry); what counts as a number is `param_spec.as_number`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vllm_adaptive.sampling import registry
from vllm_adaptive.sampling.param_spec import NumberParam, SamplerParamError, shown

if TYPE_CHECKING:
    from vllm_adaptive.config import SamplingConfig

__all__ = [
    "ALL_PARAM_KEYS", "NumberParam", "PARAMS_BY_KEY", "SAMPLERS", "SAMPLER_KEY",
    "SamplerParamError", "SamplerRequest", "parse_sampler_request", "sampler_name",
]

SAMPLER_KEY = "adaptive_sampler"

# sampler name -> its parameters (from the definitions in vllm_adaptive.sampling.registry).
SAMPLERS: dict[str, tuple[NumberParam, ...]] = {
    name: definition.params for name, definition in registry.SAMPLERS.items()
}

# Each parameter key, with its range; a key shared by samplers has one definition.
PARAMS_BY_KEY: Mapping[str, NumberParam] = registry.PARAMS_BY_KEY

ALL_PARAM_KEYS: frozenset[str] = frozenset(PARAMS_BY_KEY)


@dataclasses.dataclass(frozen=True)
class SamplerRequest:
    """What one request asked for, validated; `values` holds every parameter of the sampler."""

    name: str
    values: Mapping[str, float]


def sampler_name(extra_args: Mapping[str, Any] | None) -> str | None:
    """The sampler a request names, without validating it (for counting)."""
    if not extra_args:
        return None
    name = extra_args.get(SAMPLER_KEY)
    return name if isinstance(name, str) else None


def parse_sampler_request(
    extra_args: Mapping[str, Any] | None, defaults: SamplingConfig | None = None
) -> SamplerRequest | None:
    """Validate a request's sampler arguments; None when it asks for no adaptive sampler.

    Without `defaults` (admission), only what the request sent is checked and `values` holds
    just those; with them (worker), every parameter is filled.
    """
    extra_args = extra_args or {}
    ours = ALL_PARAM_KEYS.intersection(extra_args)
    if SAMPLER_KEY not in extra_args:
        if ours:
            key = sorted(ours)[0]
            raise SamplerParamError(
                f"{key} needs {SAMPLER_KEY} to name the sampler it belongs to; "
                f"allowed {SAMPLER_KEY} values: {sorted(SAMPLERS)}",
                key,
                extra_args[key],
            )
        return None
    name = extra_args[SAMPLER_KEY]
    if not isinstance(name, str) or name not in SAMPLERS:  # 3, True, None, [..] are no names
        raise SamplerParamError(
            f"{SAMPLER_KEY} must be one of {sorted(SAMPLERS)}, got {shown(name)}", SAMPLER_KEY, name
        )
    params = SAMPLERS[name]
    foreign = sorted(ours - {p.key for p in params})
    if foreign:
        raise SamplerParamError(
            f"{foreign[0]} does not apply to {SAMPLER_KEY}={name!r}; "
            f"its parameters are {[p.key for p in params]}",
            foreign[0],
            extra_args[foreign[0]],
        )
    values: dict[str, float] = {}
    for param in params:
        if param.key in extra_args:
            values[param.key] = param.parse(extra_args[param.key])
        elif defaults is not None:
            values[param.key] = float(getattr(defaults, param.default_from))
    return SamplerRequest(name=name, values=values)
