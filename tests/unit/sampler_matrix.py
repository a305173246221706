"""The samplers as data: how to call each batched fast path and its reference, with easy and hard
parameters and a hypothesis strategy per parameter. Adding a sampler to the shared tests
(test_sampler_matrix.py) is one `SamplerCase` here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from hypothesis import strategies as st

from vllm_adaptive.sampling import dynatemp, epsilon_eta, mirostat, mirostat_v1, top_n_sigma, typical

NEG_INF = float("-inf")

# fast(logits [R, V], params {key: tensor [K]}, rows [K] or None) -> None, in place
Fast = Callable[[torch.Tensor, Mapping[str, torch.Tensor], "torch.Tensor | None"], None]
# reference(one row [V], params {key: float}) -> the row the sampler should produce (float64)
Reference = Callable[[torch.Tensor, Mapping[str, float]], torch.Tensor]


def masked(keep: Callable[[torch.Tensor, Mapping[str, float]], torch.Tensor]) -> Reference:
    """A reference for a masking sampler from its keep-set reference."""

    def reference(row: torch.Tensor, params: Mapping[str, float]) -> torch.Tensor:
        return row.double().masked_fill(~keep(row, params), NEG_INF)

    return reference


@dataclasses.dataclass(frozen=True)
class SamplerCase:
    name: str
    fast: Fast
    reference: Reference
    easy: Mapping[str, float]
    hard: Mapping[str, float]
    strategies: Mapping[str, st.SearchStrategy[float]]
    # Parameter that bounds the kept probability mass from below (typical_p), if any.
    min_mass_key: str | None = None
    # Rescales kept logits (dynamic temperature) instead of only masking.
    rescales: bool = False
    # Parameters that switch the sampler off (rows stay bitwise as they were), if it has them.
    off: Mapping[str, float] | None = None

    def __str__(self) -> str:
        return self.name


def unit_interval(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False)


def _on_rows(
    x: torch.Tensor, rows: torch.Tensor | None, apply: Callable[[torch.Tensor], object]
) -> None:
    """Run a whole-matrix sampler on the selected rows only (the processor passes it a copy)."""
    if rows is None:
        apply(x)
        return
    sub = x.index_select(0, rows.long())
    apply(sub)
    x.index_copy_(0, rows.long(), sub)


CASES: list[SamplerCase] = [
    SamplerCase(
        "typical",
        lambda x, p, rows: typical.apply_typical_(x, p["typical_p"], rows),
        masked(lambda row, p: typical.keep_set_reference(row, p["typical_p"])),
        easy={"typical_p": 0.9},
        hard={"typical_p": 1e-4},
        strategies={"typical_p": st.one_of(unit_interval(1e-6, 1.0), st.just(1.0))},
        min_mass_key="typical_p",
        off={"typical_p": 1.0},
    ),
    SamplerCase(
        "epsilon_eta",
        lambda x, p, rows: epsilon_eta.apply_epsilon_eta_(x, p["epsilon"], p["eta_cutoff"], rows),
        masked(lambda row, p: epsilon_eta.keep_set_reference(row, p["epsilon"], p["eta_cutoff"])),
        easy={"epsilon": 3e-4, "eta_cutoff": 0.0},
        hard={"epsilon": 0.2, "eta_cutoff": 0.9},
        strategies={
            "epsilon": st.one_of(st.just(0.0), unit_interval(0.0, 0.999)),
            "eta_cutoff": st.one_of(st.just(0.0), unit_interval(0.0, 0.999)),
        },
        off={"epsilon": 0.0, "eta_cutoff": 0.0},
    ),
    SamplerCase(
        "top_n_sigma",
        lambda x, p, rows: top_n_sigma.apply_top_n_sigma_(x, p["top_n_sigma"], rows),
        masked(lambda row, p: top_n_sigma.keep_set_reference(row, p["top_n_sigma"])),
        easy={"top_n_sigma": 1.0},
        hard={"top_n_sigma": 1e-3},
        strategies={"top_n_sigma": unit_interval(1e-6, 100.0)},
    ),
    SamplerCase(
        "mirostat_v2",
        lambda x, p, rows: _on_rows(x, rows, lambda sub: mirostat.apply_keep_set_(sub, p["mu"])),
        masked(lambda row, p: mirostat.keep_set_reference(row, p["mu"])),
        easy={"mu": 10.0},
        hard={"mu": 0.05},
        strategies={"mu": unit_interval(-5.0, 80.0)},
    ),
    SamplerCase(
        "mirostat_v1",
        lambda x, p, rows: mirostat_v1.apply_keep_set_(x, p["mu"], p["mirostat_m"], rows),
        masked(lambda row, p: mirostat_v1.keep_set_reference(row, p["mu"], int(p["mirostat_m"]))),
        easy={"mu": 10.0, "mirostat_m": 100},
        hard={"mu": 0.05, "mirostat_m": 2},
        strategies={"mu": unit_interval(-5.0, 80.0), "mirostat_m": st.integers(2, 1000).map(float)},
    ),
    SamplerCase(
        "dynatemp",
        lambda x, p, rows: dynatemp.apply_dynatemp_(
            x, p["temperature"], p["dynatemp_range"], p["dynatemp_exponent"], rows
        ),
        lambda row, p: dynatemp.dynatemp_reference(
            row, p["temperature"], p["dynatemp_range"], p["dynatemp_exponent"]
        )[0],
        easy={"temperature": 1.0, "dynatemp_range": 0.5, "dynatemp_exponent": 1.0},
        hard={"temperature": 0.3, "dynatemp_range": 10.0, "dynatemp_exponent": 0.05},
        strategies={
            "temperature": unit_interval(1e-5, 4.0),
            "dynatemp_range": unit_interval(0.0, 10.0),
            "dynatemp_exponent": unit_interval(1e-3, 10.0),
        },
        rescales=True,
        off={"temperature": 0.7, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0},
    ),
    SamplerCase(
        "edt",
        lambda x, p, rows: dynatemp.apply_edt_(
            x, p["temperature"], p["edt_base"], p["edt_theta"], rows
        ),
        lambda row, p: dynatemp.edt_reference(
            row, p["temperature"], p["edt_base"], p["edt_theta"]
        )[0],
        easy={"temperature": 1.0, "edt_base": 0.8, "edt_theta": 1.0},
        hard={"temperature": 2.0, "edt_base": 0.01, "edt_theta": 10.0},
        strategies={
            "temperature": unit_interval(1e-5, 4.0),
            "edt_base": unit_interval(1e-3, 0.999),
            "edt_theta": unit_interval(1e-3, 10.0),
        },
        rescales=True,
    ),
]


def param_tensors(params: Mapping[str, float], k: int) -> dict[str, torch.Tensor]:
    return {key: torch.full((k,), float(value)) for key, value in params.items()}
