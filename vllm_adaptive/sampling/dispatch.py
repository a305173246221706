"""How the processor applies each sampler: the sampler definitions by name.

`ENTRIES[name].apply(rows [K, V], values, t0 [K])` changes the rows of the requests that chose
`name` in place (see `definition.Apply`); `.rescales` and `.stateful` say how the processor
treats its output. The definitions live in the sampler modules (vllm_adaptive.sampling.registry);
this module only gives the processor its names for them.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.registry import SAMPLERS

SamplerEntry = SamplerDefinition

ENTRIES: Mapping[str, SamplerDefinition] = SAMPLERS
