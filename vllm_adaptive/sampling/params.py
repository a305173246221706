"""Per-request sampler arguments: the names requests may use, their ranges, and their parsing.

Requests choose a sampler with flat keys in `SamplingParams.extra_args` (over HTTP:
`vllm_xargs`), e.g. `{"adaptive_sampler": "mirostat_v2", "mirostat_tau": 3.0}`. Parsing happens
twice: at admission in the API server (`validate_params`, where a bad value becomes HTTP 400
naming the parameter, the allowed values and the value sent) and in the worker (where
deployment defaults fill what the request left out). The table below is the single source of
truth for both.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from vllm_adaptive.config import SamplingConfig

SAMPLER_KEY = "adaptive_sampler"


class SamplerParamError(ValueError):
    """A bad per-request argument. `parameter` and `value` are what the client sent."""

    def __init__(self, message: str, parameter: str, value: Any) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


@dataclasses.dataclass(frozen=True)
class NumberParam:
    """A float parameter with an interval; `default_from` names the SamplingConfig field."""

    key: str
    low: float
    high: float
    default_from: str
    low_open: bool = False
    high_open: bool = False

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self._error(value)
        try:
            number = float(value)
        except ValueError:
            raise self._error(value) from None
        in_range = math.isfinite(number)
        in_range = in_range and (number > self.low if self.low_open else number >= self.low)
        in_range = in_range and (number < self.high if self.high_open else number <= self.high)
        if not in_range:
            raise self._error(value)
        return number

    def _error(self, value: Any) -> SamplerParamError:
        return SamplerParamError(
            f"{self.key} must be a number in {self.interval()}, got {value!r}", self.key, value
        )


# sampler name -> its parameters. Ranges follow the references cited in each sampler module.
SAMPLERS: dict[str, tuple[NumberParam, ...]] = {
    "mirostat_v2": (
        NumberParam("mirostat_tau", 0.0, 40.0, "mirostat_tau", low_open=True),
        NumberParam("mirostat_eta", 0.0, 1.0, "mirostat_eta", low_open=True),
    ),
}

ALL_PARAM_KEYS: frozenset[str] = frozenset(p.key for ps in SAMPLERS.values() for p in ps)


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
    if not isinstance(name, str) or name not in SAMPLERS:
        raise SamplerParamError(
            f"{SAMPLER_KEY} must be one of {sorted(SAMPLERS)}, got {name!r}", SAMPLER_KEY, name
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
