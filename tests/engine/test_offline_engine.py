"""The plugin in a real vLLM engine (offline `LLM` on CPU), shared for the whole module."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

import vllm_adaptive
from vllm_adaptive.config import SamplingConfig
from vllm_adaptive.sampling import dispatch
from vllm_adaptive.sampling.params import SAMPLERS
from reference import ENGINE_ARGS, GREEDY_MAX_TOKENS, GREEDY_PROMPTS
from vllm_adaptive.introspection import adaptive_worker_state

pytestmark = pytest.mark.engine

CONFIG = {"sampling": {"mirostat_tau": 3.25, "mirostat_eta": 0.15}}

# A KV cache of 16 blocks (128 tokens each): a max-length request fits, a batch of long ones
# does not, so the scheduler preempts. Stats on, to read vLLM's preemption counter; full-vocab
# logprobs, to read whole final distributions.
KV_CACHE_BYTES = 2 << 20  # float32 KV (reference.ENGINE_ARGS): 16 blocks of 128 tokens
ENGINE = {**ENGINE_ARGS, "kv_cache_memory_bytes": KV_CACHE_BYTES, "disable_log_stats": False,
          "max_logprobs": -1}


@pytest.fixture(scope="module")
def adaptive_llm(tiny_model: Path) -> Iterator[LLM]:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable
    llm = LLM(str(tiny_model), **vllm_adaptive.engine_kwargs(CONFIG, **ENGINE))
    yield llm
    llm.llm_engine.engine_core.shutdown()


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)


def token_ids(outputs: list) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_outputs_equal_plain_vllm(adaptive_llm: LLM, plain_greedy_token_ids: list[list[int]]) -> None:
    outputs = adaptive_llm.generate(GREEDY_PROMPTS, greedy())
    assert token_ids(outputs) == plain_greedy_token_ids


def test_worker_sees_the_adaptive_config(adaptive_llm: LLM) -> None:
    states = adaptive_llm.collective_rpc(adaptive_worker_state)
    assert len(states) == 1
    assert states[0]["pid"] != os.getpid()  # really another process
    [processor] = states[0]["processors"]
    assert processor["runner_interface"] == "v1"
    assert processor["config"]["sampling"] == {
        **dataclasses.asdict(SamplingConfig()), "mirostat_tau": 3.25, "mirostat_eta": 0.15
    }


def mean_surprise_bits(output) -> float:
    logprobs = [next(iter(lp.values())).logprob for lp in output.outputs[0].logprobs]
    # logprobs[i] is keyed by the sampled token; processed_logprobs: the final distribution
    sampled = [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
    assert len(sampled) == len(logprobs)
    return -sum(sampled) / len(sampled) / math.log(2)


def preemptions(llm: LLM) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def test_mixed_batch_mirostat_follows_tau_through_preemption(
    adaptive_llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    """Long Mirostat requests beside greedy and plain ones, with more KV than the cache holds."""
    mirostat = [("mirostat_v2", 2.0), ("mirostat_v2", 4.0), ("mirostat_v1", 3.0), ("mirostat_v1", 5.0)] * 2
    sampled = [
        SamplingParams(temperature=1.0, max_tokens=300, ignore_eos=True, logprobs=0, seed=11 + i,
                       extra_args={"adaptive_sampler": name, "mirostat_tau": tau, "mirostat_eta": 0.1})
        for i, (name, tau) in enumerate(mirostat)
    ]
    plain_random = SamplingParams(temperature=1.0, max_tokens=300, ignore_eos=True, logprobs=0, seed=5)
    prompts = GREEDY_PROMPTS + ["Once upon a time"] * (len(sampled) + 1)
    params = [greedy()] * len(GREEDY_PROMPTS) + [*sampled, plain_random]
    before = preemptions(adaptive_llm)
    outputs = adaptive_llm.generate(prompts, params)
    # 9 requests of ~300 tokens need 27 blocks of 128 tokens; the cache has 16
    assert preemptions(adaptive_llm) > before

    # greedy requests batched with sampled ones are exactly plain vLLM's
    assert token_ids(outputs[: len(GREEDY_PROMPTS)]) == plain_greedy_token_ids
    # each Mirostat request's observed surprise settles on its own target
    for (name, tau), output in zip(mirostat, outputs[len(GREEDY_PROMPTS) : -1]):
        assert len(output.outputs[0].token_ids) == 300
        assert abs(mean_surprise_bits(output) - tau) < 0.5, (name, tau, mean_surprise_bits(output))
    # the plain sampled request is not truncated: its surprise is far above every target
    assert mean_surprise_bits(outputs[-1]) > 6.0


# Parameters under which each sampler changes the tiny model's (rather flat) distributions.
SAMPLER_ARGS: dict[str, dict[str, float]] = {
    "mirostat_v1": {"mirostat_tau": 3.0},
    "mirostat_v2": {"mirostat_tau": 3.0},
    "dynatemp": {"dynatemp_range": 0.5, "dynatemp_exponent": 1.0},
    "edt": {"edt_base": 0.5, "edt_theta": 2.0},
    "typical": {"typical_p": 0.5},
    "epsilon": {"epsilon": 1e-3},
    "eta": {"eta_cutoff": 0.05},
    "top_n_sigma": {"top_n_sigma": 1.0},
}


def first_step_logprobs(output) -> torch.Tensor:  # noqa: ANN001
    """The whole final distribution of a request's first step, as log-probabilities [V]."""
    [step] = output.outputs[0].logprobs
    row = torch.full((len(step),), float("-inf"), dtype=torch.float64)
    for token, logprob in step.items():
        row[token] = logprob.logprob
    return row


def expected_first_step(name: str, tempered: torch.Tensor, temperature: float) -> torch.Tensor:
    """Our sampler applied, outside the engine, to the tempered row plain vLLM produced."""
    values = {**{p.key: float(getattr(SamplingConfig(), p.default_from)) for p in SAMPLERS[name]},
              **SAMPLER_ARGS[name]}
    params = {k: torch.tensor([v], dtype=torch.float32) for k, v in values.items()}
    if dispatch.ENTRIES[name].stateful:
        params["mu"] = torch.tensor([2.0 * values["mirostat_tau"]])  # mu starts at 2 tau
    row = tempered.float().unsqueeze(0)
    dispatch.ENTRIES[name].apply(row, params, torch.tensor([temperature]))
    return torch.log_softmax(row[0].double(), dim=-1)


def test_mixed_batch_gives_every_request_its_own_sampler(adaptive_llm: LLM) -> None:
    """One batch: each sampler, a plain twin at the same temperature, and greedy requests.

    The plain twin's processed logprobs are vLLM's tempered distribution for the prompt; the
    sampler request's first-step distribution must be our sampler applied to exactly that.
    """
    names = list(SAMPLER_ARGS)
    assert set(names) == set(SAMPLERS)
    temperature = {name: 0.7 + 0.1 * i for i, name in enumerate(names)}
    prompt = "Once upon a time"
    params = []
    for name in names:
        common = {"temperature": temperature[name], "max_tokens": 1, "logprobs": -1, "seed": 3}
        params.append(SamplingParams(**common, extra_args={"adaptive_sampler": name, **SAMPLER_ARGS[name]}))
        params.append(SamplingParams(**common))
    params += [greedy()] * 2
    outputs = adaptive_llm.generate([prompt] * len(params), params)
    for i, name in enumerate(names):
        got = first_step_logprobs(outputs[2 * i])
        tempered = first_step_logprobs(outputs[2 * i + 1])
        assert torch.isfinite(tempered).all()  # the plain twin is untruncated
        want = expected_first_step(name, tempered, temperature[name])
        kept_got, kept_want = torch.isfinite(got), torch.isfinite(want)
        # float32 rounding of the reconstructed row may move at most one token across a cutoff
        assert (kept_got != kept_want).sum() <= 1, (name, int(kept_got.sum()), int(kept_want.sum()))
        both = kept_got & kept_want
        if dispatch.ENTRIES[name].rescales:
            assert kept_got.all()
            assert (got - tempered).abs().max() > 0.05, f"{name} did not change the distribution"
            torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        else:
            assert 0 < int(kept_got.sum()) < len(got), f"{name} kept {int(kept_got.sum())} tokens"
            # renormalised over (nearly) the same set: the same log-probabilities
            torch.testing.assert_close(got[both], want[both], atol=2e-3, rtol=0)
    assert outputs[-1].outputs[0].token_ids == outputs[-2].outputs[0].token_ids


def test_mirostat_offline_request_via_extra_args_is_reproducible(adaptive_llm: LLM) -> None:
    params = SamplingParams(temperature=0.8, max_tokens=32, seed=123,
                            extra_args={"adaptive_sampler": "mirostat_v2", "mirostat_tau": 3.0})
    first, second = adaptive_llm.generate(["Hello"] * 2, [params, params])
    assert first.outputs[0].token_ids == second.outputs[0].token_ids


def test_bad_sampler_argument_is_refused_offline_and_engine_keeps_serving(adaptive_llm: LLM) -> None:
    bad = SamplingParams(max_tokens=4, extra_args={"adaptive_sampler": "mirostat_v2", "mirostat_tau": -1})
    with pytest.raises(VLLMValidationError, match=r"mirostat_tau must be a number in \(0, 40\], got -1") as e:
        adaptive_llm.generate(["Hello"], bad)
    assert e.value.parameter == "mirostat_tau" and e.value.value == -1
    assert token_ids(adaptive_llm.generate(GREEDY_PROMPTS[:1], greedy()))[0]
