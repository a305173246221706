"""What an adaptive sampler is, in one object: `SamplerDefinition`.

Each sampler module declares its definition next to the code it names (its parameters with
default, range and meaning; its batched in-place fast form; its float64 reference), and
`vllm_adaptive.sampling.registry` collects them. The request parser (`sampling.params`), the
deployment config (`config.SamplingConfig`), the logits processor and the test matrix
(tests/unit/sampler_matrix.py) are all derived from the registry, so a new sampler is one
definition in its module plus one line in the registry.

A leaf module: it imports only `param_spec` (torch appears in type hints only).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vllm_adaptive.sampling.param_spec import NumberParam

if TYPE_CHECKING:
    import torch

# The state key a stateful sampler (Mirostat) receives besides its parameters: mu, in bits.
STATE_KEY = "mu"

# apply(logits [R, V] float32 already divided by each request's temperature, values {key: [K]},
#       t0 [K] the requests' temperatures, rows [K] or None) -> kept logsumexp [K] or None.
# Changes the selected rows (every row when `rows` is None) in place; values holds one float32
# tensor per parameter, plus STATE_KEY for a stateful sampler.
Apply = Callable[
    ["torch.Tensor", Mapping[str, "torch.Tensor"], "torch.Tensor", "torch.Tensor | None"],
    "torch.Tensor | None",
]
# reference(one row [V] already divided by t0, values {key: float}, t0) -> the row the sampler
# must produce, in float64: -inf where a token is dropped.
Reference = Callable[["torch.Tensor", Mapping[str, float], float], "torch.Tensor"]


@dataclasses.dataclass(frozen=True)
class SamplerDefinition:
    """One adaptive sampler, as requests name it (`adaptive_sampler: <name>`)."""

    name: str
    # One line: what the sampler does (docs, listings).
    summary: str
    # The request keys it accepts, each with its default, range and meaning. A key shared by
    # samplers (mirostat_tau) is the same NumberParam object in each.
    params: tuple[NumberParam, ...]
    apply: Apply
    reference: Reference
    # Rewrites finite logits (a temperature) instead of only masking tokens to -inf.
    rescales: bool = False
    # Keeps STATE_KEY per request, updated from each sampled token; `apply` then returns the
    # logsumexp of each row's kept logits, from which the surprise of that token is measured.
    stateful: bool = False
    # Parameter values (in range) with which the sampler leaves every row bitwise as it was.
    identity: Mapping[str, float] | None = None
    # A parameter that bounds the kept probability mass from below (typical_p), if any.
    min_kept_mass: str | None = None

    def __post_init__(self) -> None:
        keys = self.keys()
        if len(set(keys)) != len(keys):
            raise ValueError(f"sampler {self.name}: a parameter is listed twice: {list(keys)}")
        for param in self.params:
            if param.default is None or not param.contains(param.default):
                raise ValueError(
                    f"sampler {self.name}: {param.key} needs a default in {param.interval()}, "
                    f"got {param.default!r}"
                )
        for key, value in (self.identity or {}).items():
            if key not in keys or not self.param(key).contains(value):
                raise ValueError(f"sampler {self.name}: identity value {key}={value!r} is not a parameter value")
        if self.min_kept_mass is not None and self.min_kept_mass not in keys:
            raise ValueError(f"sampler {self.name}: min_kept_mass names no parameter: {self.min_kept_mass!r}")

    def keys(self) -> tuple[str, ...]:
        return tuple(p.key for p in self.params)

    def param(self, key: str) -> NumberParam:
        for p in self.params:
            if p.key == key:
                return p
        raise KeyError(f"sampler {self.name} has no parameter {key!r}; its parameters are {list(self.keys())}")

    def defaults(self) -> dict[str, float]:
        return {p.key: float(p.default) for p in self.params}  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.name
