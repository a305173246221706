"""The samplers as data, derived from their definitions (vllm_adaptive.sampling.registry): the
fast form each definition gives the processor, its float64 reference, parameter settings taken
from the declared defaults and ranges, and a hypothesis strategy per parameter from its range.
A sampler registered there is in the shared tests (test_sampler_matrix.py) with no line here.

Only what a definition does not declare is chosen here: the request temperature t0 of each
setting and, for Mirostat, its state mu (from the tau of the setting, as the processor starts
it, and any value mu can drift to in the property tests).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from hypothesis import strategies as st

from vllm_adaptive.sampling import mirostat
from vllm_adaptive.sampling.definition import STATE_KEY, SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam
from vllm_adaptive.sampling.registry import SAMPLERS

NEG_INF = float("-inf")

# Request temperature per setting: rescaling samplers depend on it (dynatemp clamps T_min at 0
# below dynatemp_range); masking ones ignore it.
SETTING_T0 = {"defaults": 1.0, "low": 0.3, "high": 2.0}


def inside(param: NumberParam, end: str) -> float:
    """The parameter's low or high end, or just inside it where the interval is open there."""
    nudge = 1e-3 * min(1.0, param.high - param.low)
    if end == "low":
        return param.low + nudge if param.low_open else param.low
    return param.high - nudge if param.high_open else param.high


def range_strategy(param: NumberParam) -> st.SearchStrategy[float]:
    """Any float32 value the parameter accepts, its closed ends included."""
    return st.floats(
        param.low, param.high, exclude_min=param.low_open, exclude_max=param.high_open,
        allow_nan=False, allow_infinity=False, width=32,
    )


@dataclasses.dataclass(frozen=True)
class SamplerCase:
    definition: SamplerDefinition
    # setting name -> values {key: float} (parameters, plus mu for a stateful sampler)
    settings: Mapping[str, Mapping[str, float]]
    strategies: Mapping[str, st.SearchStrategy[float]]

    @property
    def name(self) -> str:
        return self.definition.name

    def fast(
        self, logits: torch.Tensor, values: Mapping[str, torch.Tensor], t0: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.definition.apply(logits, values, t0, rows)

    def reference(self, row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
        return self.definition.reference(row, values, t0)

    def __str__(self) -> str:
        return self.name


def _case(definition: SamplerDefinition) -> SamplerCase:
    settings: dict[str, dict[str, float]] = {
        "defaults": definition.defaults(),
        "low": {p.key: inside(p, "low") for p in definition.params},
        "high": {p.key: inside(p, "high") for p in definition.params},
    }
    strategies: dict[str, st.SearchStrategy[float]] = {
        p.key: range_strategy(p) for p in definition.params
    }
    if definition.stateful:
        for values in settings.values():
            values[STATE_KEY] = mirostat.initial_mu(values["mirostat_tau"])
        strategies[STATE_KEY] = st.floats(-5.0, 80.0, allow_nan=False, width=32)
    return SamplerCase(definition, settings, strategies)


CASES: list[SamplerCase] = [_case(d) for d in SAMPLERS.values()]
SETTINGS = tuple(SETTING_T0)


def param_tensors(values: Mapping[str, float], k: int) -> dict[str, torch.Tensor]:
    return {key: torch.full((k,), float(value)) for key, value in values.items()}
