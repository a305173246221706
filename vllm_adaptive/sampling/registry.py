"""Every adaptive sampler a request may name, collected from the definitions in their modules.

`SAMPLERS` maps the name a request sends as `adaptive_sampler` to its `SamplerDefinition`
(vllm_adaptive.sampling.definition). The request parser (`sampling.params`), the deployment
defaults (`config.SamplingConfig`, one field per parameter key), the logits processor and the
test matrix all read this table; adding a sampler is its definition plus one line here.
"""

from __future__ import annotations

from types import MappingProxyType
from collections.abc import Mapping

from vllm_adaptive.sampling import dynatemp, epsilon_eta, mirostat, mirostat_v1, top_n_sigma, typical
from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam


def _collect(*definitions: SamplerDefinition) -> Mapping[str, SamplerDefinition]:
    by_name: dict[str, SamplerDefinition] = {}
    by_key: dict[str, NumberParam] = {}
    for definition in definitions:
        if definition.name in by_name:
            raise RuntimeError(f"two samplers are named {definition.name!r}")
        by_name[definition.name] = definition
        for param in definition.params:
            # A key shared by samplers has one range and one default (one config field).
            if by_key.setdefault(param.key, param) != param:
                raise RuntimeError(
                    f"parameter {param.key!r} of sampler {definition.name!r} differs from "
                    f"another sampler's: {param} != {by_key[param.key]}"
                )
    return MappingProxyType(by_name)


SAMPLERS: Mapping[str, SamplerDefinition] = _collect(
    mirostat_v1.DEFINITION,
    mirostat.DEFINITION,
    dynatemp.DEFINITION,
    dynatemp.EDT_DEFINITION,
    typical.DEFINITION,
    epsilon_eta.EPSILON_DEFINITION,
    epsilon_eta.ETA_DEFINITION,
    top_n_sigma.DEFINITION,
)

# Each parameter key with its one definition, in the order the samplers list them.
PARAMS_BY_KEY: Mapping[str, NumberParam] = MappingProxyType(
    {p.key: p for d in SAMPLERS.values() for p in d.params}
)
