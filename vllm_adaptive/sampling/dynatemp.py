"""Entropy-based dynamic temperature: llama.cpp's dynatemp (`llama_sampler_temp_ext`, from
kalomaze's DynaTemp) and, as a variant, EDT (Zhang et al. 2024, "EDT: Improving Large Language
Models' Generation by Entropy-based Dynamic Temperature Sampling", arXiv 2403.14541).

dynatemp (sampler `dynatemp`): with T0 the request's temperature, delta = dynatemp_range,
H the entropy (nats) of softmax(logits / 1) over the N candidates with a finite logit,
    T = T_min + (T_max - T_min) * (H / ln N)^dynatemp_exponent,
    T_min = max(0, T0 - delta), T_max = T0 + delta,
so for T0 >= delta this is T = (T0 - delta) + 2 delta (H / ln N)^exponent, and below that the
range is clamped at 0 at its low end (llama.cpp's min_temp), not T itself clamped.
As in llama.cpp the entropy is that of the logits before any temperature: the processor receives
logits already divided by T0, so it measures H on logits * T0 and returns logits * T0 / T.
Parameters: dynatemp_range (delta) in [0, 10], default 0.5 (llama.cpp's default 0 means off;
a request that picks this sampler wants it on, and 0.5 around T0 = 1 spans [0.5, 1.5]);
dynatemp_exponent in (0, 10], default 1.0 (llama.cpp's).

EDT (sampler `edt`): T = T0 * edt_base^(edt_theta / H). Parameters: edt_base in (0, 1),
default 0.8, and edt_theta in (0, 10], default 1.0 (our defaults; tune per task).

Rows left exactly as they are: delta = 0 (dynatemp), fewer than two finite logits, T0 <= 0.
Where T falls below 1e-5 (vLLM's greedy temperature; e.g. H = 0 in EDT, or T_min = 0 with a
certain row) the row keeps only its top token(s), as llama.cpp's temperature 0 does, instead of
dividing by ~0.

Both are O(V) per row: `row_stats` (entropy, count) and one elementwise rescale.
`dynatemp_reference` and `edt_reference` are the definitions for one row, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from vllm_adaptive.kernels.row_stats import RowStats, row_stats
from vllm_adaptive.sampling.batch_rows import check_batch, selected, write_rows_
from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam

RANGE = NumberParam(
    "dynatemp_range", 0.0, 10.0, default=0.5,
    meaning="temperature range around the request's temperature (0: off)",
)
EXPONENT = NumberParam(
    "dynatemp_exponent", 0.0, 10.0, low_open=True, default=1.0,
    meaning="exponent of the normalised entropy",
)
EDT_BASE = NumberParam(
    "edt_base", 0.0, 1.0, low_open=True, high_open=True, default=0.8,
    meaning="base N of T = temperature * N ** (theta / H)",
)
EDT_THETA = NumberParam(
    "edt_theta", 0.0, 10.0, low_open=True, default=1.0,
    meaning="theta of T = temperature * N ** (theta / H)",
)

# vLLM samples greedily below this temperature; a dynamic one this small keeps the top token.
GREEDY_TEMPERATURE = 1e-5


def dynatemp_temperature(
    stats: RowStats, t0: torch.Tensor, delta: torch.Tensor, exponent: torch.Tensor
) -> torch.Tensor:
    """llama.cpp's dynamic temperature [K] from the statistics of the untempered logits."""
    t_min = (t0 - delta).clamp(min=0.0)
    t_max = t0 + delta
    max_entropy = torch.log(stats.count.clamp(min=2).float())
    normalized = (stats.entropy / max_entropy).clamp(0.0, 1.0)
    return t_min + (t_max - t_min) * normalized.pow(exponent)


def edt_temperature(
    stats: RowStats, t0: torch.Tensor, base: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """EDT's temperature [K]: T0 * base^(theta / H); H = 0 gives 0 (greedy)."""
    return t0 * base.pow(theta / stats.entropy)


def apply_dynatemp_(
    logits: torch.Tensor,
    t0: torch.Tensor,
    delta: torch.Tensor,
    exponent: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace logits (already / T0) by logits * T0 / T_dyn in place, on `rows` (all when None)."""
    check_batch("apply_dynatemp_", logits, rows, t0=t0, delta=delta, exponent=exponent)
    return _retemper_(
        logits, rows, t0, delta > 0, lambda stats: dynatemp_temperature(stats, t0, delta, exponent)
    )


def apply_edt_(
    logits: torch.Tensor,
    t0: torch.Tensor,
    base: torch.Tensor,
    theta: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """EDT: replace logits (already / T0) by logits * T0 / T_edt in place, on `rows`."""
    check_batch("apply_edt_", logits, rows, t0=t0, base=base, theta=theta)
    return _retemper_(
        logits, rows, t0, torch.ones_like(t0, dtype=torch.bool),
        lambda stats: edt_temperature(stats, t0, base, theta),
    )


def _retemper_(
    logits: torch.Tensor,
    rows: torch.Tensor | None,
    t0: torch.Tensor,
    active: torch.Tensor,
    temperature: Callable[[RowStats], torch.Tensor],
) -> torch.Tensor:
    if not logits.is_cuda and not bool(active.any()):  # a host read only off CUDA
        return logits
    sub = selected(logits, rows)
    raw = sub * torch.where(t0 > 0, t0, 1.0).unsqueeze(-1)  # no 0 * -inf for T0 = 0 rows
    stats = row_stats(raw, fields=("entropy", "count"))
    t = temperature(stats)
    active = active & (stats.count > 1) & (t0 > 0) & torch.isfinite(t)
    greedy = t < GREEDY_TEMPERATURE
    out = raw.div_(torch.where(greedy, 1.0, t).unsqueeze(-1))  # raw is ours: rescale in place
    if logits.is_cuda or bool(greedy.any()):
        top_only = sub.masked_fill(sub < sub.amax(dim=-1, keepdim=True), float("-inf"))
        out = torch.where(greedy.unsqueeze(-1), top_only, out)
    write_rows_(logits, rows, out, active)
    return logits


def dynatemp_reference(
    logits: torch.Tensor, t0: float, delta: float, exponent: float
) -> tuple[torch.Tensor, float | None]:
    """One row [V] (already / T0) -> (new row in float64, T); T is None for a row left alone."""
    raw = [v * t0 for v in logits.double().tolist()]
    entropy, n = _entropy(raw)
    if delta <= 0.0 or n <= 1 or t0 <= 0.0:
        return logits.double(), None
    t_min = max(0.0, t0 - delta)
    t_max = t0 + delta
    t = t_min + (t_max - t_min) * (entropy / math.log(n)) ** exponent
    return _rescaled(logits, raw, t), t


def edt_reference(
    logits: torch.Tensor, t0: float, base: float, theta: float
) -> tuple[torch.Tensor, float | None]:
    """One row [V] (already / T0) -> (new row in float64, T); T is None for a row left alone."""
    raw = [v * t0 for v in logits.double().tolist()]
    entropy, n = _entropy(raw)
    if n <= 1 or t0 <= 0.0:
        return logits.double(), None
    t = t0 * base ** (theta / entropy) if entropy > 0.0 else 0.0
    return _rescaled(logits, raw, t), t


def _entropy(raw: list[float]) -> tuple[float, int]:
    finite = [v for v in raw if v != float("-inf")]
    if not finite:
        return 0.0, 0
    top = max(finite)
    z = sum(math.exp(v - top) for v in finite)
    probs = [math.exp(v - top) / z for v in finite]
    return -sum(p * math.log(p) for p in probs if p > 0.0), len(finite)


def _rescaled(logits: torch.Tensor, raw: list[float], t: float) -> torch.Tensor:
    if t < GREEDY_TEMPERATURE:
        x = logits.double()
        return x.masked_fill(x < x.max(), float("-inf"))
    return torch.tensor([v / t for v in raw], dtype=torch.float64)


def _apply_dynatemp(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    apply_dynatemp_(logits, t0, values["dynatemp_range"], values["dynatemp_exponent"], rows)


def _reference_dynatemp(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    return dynatemp_reference(row, t0, values["dynatemp_range"], values["dynatemp_exponent"])[0]


def _apply_edt(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    apply_edt_(logits, t0, values["edt_base"], values["edt_theta"], rows)


def _reference_edt(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    return edt_reference(row, t0, values["edt_base"], values["edt_theta"])[0]


DEFINITION = SamplerDefinition(
    name="dynatemp",
    summary="dynamic temperature from the entropy, within temperature +- dynatemp_range",
    params=(RANGE, EXPONENT),
    apply=_apply_dynatemp,
    reference=_reference_dynatemp,
    rescales=True,
    identity={"dynatemp_range": 0.0, "dynatemp_exponent": 1.0},
)

EDT_DEFINITION = SamplerDefinition(
    name="edt",
    summary="EDT: temperature * edt_base ** (edt_theta / entropy)",
    params=(EDT_BASE, EDT_THETA),
    apply=_apply_edt,
    reference=_reference_edt,
    rescales=True,
)

NAME = DEFINITION.name
PARAMS = DEFINITION.params
DYNATEMP_RANGE_DEFAULT = RANGE.default
DYNATEMP_EXPONENT_DEFAULT = EXPONENT.default
EDT_NAME = EDT_DEFINITION.name
EDT_PARAMS = EDT_DEFINITION.params
EDT_BASE_DEFAULT = EDT_BASE.default
EDT_THETA_DEFAULT = EDT_THETA.default
