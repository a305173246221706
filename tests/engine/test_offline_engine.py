"""The plugin in a real vLLM engine (offline `LLM` on CPU), shared for the whole module."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

import vllm_adaptive
from reference import ENGINE_ARGS, GREEDY_MAX_TOKENS, GREEDY_PROMPTS
from vllm_adaptive.introspection import adaptive_worker_state

pytestmark = pytest.mark.engine

CONFIG = {"sampling": {"mirostat_tau": 3.25, "mirostat_eta": 0.15}}


@pytest.fixture(scope="module")
def adaptive_llm(tiny_model: Path) -> Iterator[LLM]:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable
    llm = LLM(str(tiny_model), **vllm_adaptive.engine_kwargs(CONFIG, **ENGINE_ARGS))
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
    assert processor["config"]["sampling"] == {"enabled": True, "mirostat_tau": 3.25, "mirostat_eta": 0.15}


def mean_surprise_bits(output) -> float:
    logprobs = [next(iter(lp.values())).logprob for lp in output.outputs[0].logprobs]
    # logprobs[i] is keyed by the sampled token; processed_logprobs: the final distribution
    sampled = [lp[t].logprob for lp, t in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
    assert len(sampled) == len(logprobs)
    return -sum(sampled) / len(sampled) / math.log(2)


def test_mixed_batch_gives_each_request_what_it_asked_for(
    adaptive_llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    taus = [2.0, 4.0]
    mirostat = [
        SamplingParams(temperature=1.0, max_tokens=220, ignore_eos=True, logprobs=0, seed=11 + i,
                       extra_args={"adaptive_sampler": "mirostat_v2", "mirostat_tau": tau, "mirostat_eta": 0.1})
        for i, tau in enumerate(taus)
    ]
    plain_random = SamplingParams(temperature=1.0, max_tokens=220, ignore_eos=True, logprobs=0, seed=5)
    prompts = GREEDY_PROMPTS + ["Once upon a time"] * 3
    params = [greedy()] * len(GREEDY_PROMPTS) + [*mirostat, plain_random]
    outputs = adaptive_llm.generate(prompts, params)

    # greedy requests batched with sampled ones are exactly plain vLLM's
    assert token_ids(outputs[: len(GREEDY_PROMPTS)]) == plain_greedy_token_ids
    # each Mirostat request's observed surprise settles on its own target
    for tau, output in zip(taus, outputs[len(GREEDY_PROMPTS) : -1]):
        assert len(output.outputs[0].token_ids) == 220
        assert abs(mean_surprise_bits(output) - tau) < 0.5, (tau, mean_surprise_bits(output))
    # the plain sampled request is not truncated: its surprise is far above both targets
    assert mean_surprise_bits(outputs[-1]) > max(taus) + 1.0


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
