"""How the processor applies each registered sampler to a batch of rows.

Every entry takes the rows of the requests that chose it, as float32 logits [K, V] already
divided by each request's temperature (`t0` [K]), and one float32 tensor [K] per parameter
(Mirostat also gets its state `mu` [K]). It changes the rows in place. Masking samplers only set
entries to -inf; rescaling ones (dynatemp, edt) replace the row. Mirostat entries return the
logsumexp of each row's kept logits, from which the processor measures the surprise of the token
sampled next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch

from vllm_adaptive.sampling import dynatemp, epsilon_eta, mirostat, mirostat_v1, top_n_sigma, typical
from vllm_adaptive.sampling.params import SAMPLERS

Params = Mapping[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SamplerEntry:
    name: str
    # (rows [K, V], parameters, t0 [K]) -> kept logsumexp [K] for Mirostat, else None
    apply: Callable[[torch.Tensor, Params, torch.Tensor], torch.Tensor | None]
    rescales: bool = False  # rewrites finite logits (a temperature) instead of only masking
    stateful: bool = False  # keeps mu per request, updated from the sampled token


def _zeros(p: Params) -> torch.Tensor:
    first = next(iter(p.values()))
    return torch.zeros_like(first)


def _none(_: torch.Tensor) -> None:
    return None


ENTRIES: dict[str, SamplerEntry] = {
    e.name: e
    for e in (
        SamplerEntry(
            "mirostat_v1",
            lambda x, p, t0: mirostat_v1.apply_keep_set_(x, p["mu"], p["mirostat_m"]),
            stateful=True,
        ),
        SamplerEntry(
            "mirostat_v2", lambda x, p, t0: mirostat.apply_keep_set_(x, p["mu"]), stateful=True
        ),
        SamplerEntry(
            "dynatemp",
            lambda x, p, t0: _none(
                dynatemp.apply_dynatemp_(x, t0, p["dynatemp_range"], p["dynatemp_exponent"])
            ),
            rescales=True,
        ),
        SamplerEntry(
            "edt",
            lambda x, p, t0: _none(dynatemp.apply_edt_(x, t0, p["edt_base"], p["edt_theta"])),
            rescales=True,
        ),
        SamplerEntry("typical", lambda x, p, t0: _none(typical.apply_typical_(x, p["typical_p"]))),
        SamplerEntry(
            "epsilon",
            lambda x, p, t0: _none(epsilon_eta.apply_epsilon_eta_(x, p["epsilon"], _zeros(p))),
        ),
        SamplerEntry(
            "eta",
            lambda x, p, t0: _none(epsilon_eta.apply_epsilon_eta_(x, _zeros(p), p["eta_cutoff"])),
        ),
        SamplerEntry(
            "top_n_sigma", lambda x, p, t0: _none(top_n_sigma.apply_top_n_sigma_(x, p["top_n_sigma"]))
        ),
    )
}

if set(ENTRIES) != set(SAMPLERS):  # pragma: no cover - a registration mistake, caught at import
    raise RuntimeError(
        f"samplers registered in params.SAMPLERS {sorted(SAMPLERS)} and applied in "
        f"dispatch.ENTRIES {sorted(ENTRIES)} differ"
    )
