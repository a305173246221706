"""Request scenarios: what each load-test request adds to its body, by name.

A scenario is data: a one-line entry in `SCENARIOS` whose `body` is merged into every request
(sampling parameters, and `vllm_xargs` for the plugin's per-request features). There is one
scenario per adaptive sampler (named like the sampler) and plain vLLM baselines; a feature that
adds a per-request mode adds its line here. tests/loadtest checks that every sampler the plugin
registers has a scenario whose arguments the plugin accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scenario:
    description: str
    body: Mapping[str, Any] = field(default_factory=dict)


def _sampler(name: str, **params: float) -> Scenario:
    """The plugin's adaptive sampler `name` with these parameters, through `vllm_xargs`."""
    settings = ", ".join(f"{key} {value:g}" for key, value in params.items())
    return Scenario(
        f"adaptive sampler {name} ({settings})",
        {"vllm_xargs": {"adaptive_sampler": name, **params}},
    )


SCENARIOS: dict[str, Scenario] = {
    "plain": Scenario("vLLM's own random sampling (temperature 1), no adaptive sampler"),
    "greedy": Scenario("vLLM's greedy decoding (temperature 0)", {"temperature": 0.0}),
    # One per adaptive sampler the plugin serves (vllm_adaptive.sampling.params.SAMPLERS), with
    # typical settings; add a line here when a sampler is registered there.
    "mirostat_v1": _sampler("mirostat_v1", mirostat_tau=3.0, mirostat_eta=0.1, mirostat_m=100),
    "mirostat_v2": _sampler("mirostat_v2", mirostat_tau=3.0, mirostat_eta=0.1),
    "dynatemp": _sampler("dynatemp", dynatemp_range=0.5, dynatemp_exponent=1.0),
    "edt": _sampler("edt", edt_base=0.8, edt_theta=1.0),
    "typical": _sampler("typical", typical_p=0.9),
    "epsilon": _sampler("epsilon", epsilon=3e-4),
    "eta": _sampler("eta", eta_cutoff=6e-4),
    "top_n_sigma": _sampler("top_n_sigma", top_n_sigma=1.0),
    # KV compaction (README, "KV-cache compaction"): the server needs `kvcache.enabled: true`.
    "kv_streaming": Scenario("KV compaction to 1/4 of the prompt, streaming selection (kvcache.enabled)",
                             {"vllm_xargs": {"kv_budget": 0.25, "kv_policy": "streaming"}}),
    "kv_snapkv": Scenario("KV compaction to 1/4 of the prompt, SnapKV selection (kvcache.enabled)",
                          {"vllm_xargs": {"kv_budget": 0.25, "kv_policy": "snapkv"}}),
}

DEFAULT_SCENARIO = "plain"


class UnknownScenarioError(ValueError):
    pass


def get_scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UnknownScenarioError(
            f"unknown scenario {name!r}; known scenarios: {', '.join(SCENARIOS)}"
        ) from None


def describe_scenarios() -> str:
    width = max(len(name) for name in SCENARIOS)
    return "\n".join(f"{name:<{width}}  {s.description}" for name, s in SCENARIOS.items())
