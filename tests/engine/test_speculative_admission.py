"""On a deployment that runs speculative decoding, adaptive samplers are refused at admission.

vLLM's V1 runner does not run custom logits processors on speculative steps, so the plugin
does not load its processor there; the spec-decode-admission patch must then answer requests
that name a sampler with a validation error saying why, instead of serving them plainly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

import vllm_adaptive
from reference import ENGINE_ARGS

pytestmark = pytest.mark.engine

NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def speculative_llm(tiny_model: Path) -> Iterator[LLM]:
    llm = LLM(str(tiny_model), **vllm_adaptive.engine_kwargs({}, speculative_config=NGRAM, **ENGINE_ARGS))
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.mark.parametrize(
    ("extra_args", "parameter"),
    [
        ({"adaptive_sampler": "mirostat_v2"}, "adaptive_sampler"),
        ({"adaptive_sampler": "typical", "typical_p": 0.5}, "adaptive_sampler"),
        ({"top_n_sigma": 1.0}, "top_n_sigma"),
    ],
)
def test_sampler_requests_are_refused_with_the_reason(
    speculative_llm: LLM, extra_args: dict, parameter: str
) -> None:
    params = SamplingParams(temperature=0.8, max_tokens=8, extra_args=extra_args)
    with pytest.raises(VLLMValidationError, match="runs speculative decoding") as e:
        speculative_llm.generate(["Hello"], params)
    assert e.value.parameter == parameter
    assert e.value.value == extra_args[parameter]


def test_plain_requests_are_served(speculative_llm: LLM) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    sampled = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True, seed=1,
                             extra_args={"some_other_key": 1})
    outputs = speculative_llm.generate(["Hello world", "One two three"], [greedy, sampled])
    assert [len(o.outputs[0].token_ids) for o in outputs] == [16, 16]
