"""The plugin in a real vLLM engine (offline `LLM` on CPU), shared for the whole module."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError

import vllm_adaptive
from vllm_adaptive.config import SamplingConfig
from vllm_adaptive.sampling.params import SAMPLERS
from reference import ENGINE_ARGS, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, sampler_reference
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


def processor_state(llm: LLM) -> dict[str, Any]:
    """The worker's AdaptiveLogitsProcessor, as vllm_adaptive.introspection reports it."""
    [worker] = llm.collective_rpc(adaptive_worker_state)
    [processor] = worker["processors"]
    return processor


LONG_PROMPT = "Once upon a time"
MIROSTAT_REQUESTS = [("mirostat_v2", 2.0), ("mirostat_v2", 4.0), ("mirostat_v1", 3.0), ("mirostat_v1", 5.0)]


def long_sampled(seed: int, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=1.0, max_tokens=300, ignore_eos=True, logprobs=0, seed=seed,
                          extra_args=extra or None)


def test_mirostat_state_survives_preemption(adaptive_llm: LLM, plain_greedy_token_ids: list[list[int]]) -> None:
    """A preempted Mirostat request resumes with the mu it had: its tokens are those of the same
    request run without preemption (same seed), token for token.

    Each token depends on mu through the keep-set, so a mu that restarted at 2 tau on resume,
    or missed the update owed for the token sampled just before preemption, gives other tokens.
    """
    mirostat = [long_sampled(11 + i, adaptive_sampler=name, mirostat_tau=tau, mirostat_eta=0.1)
                for i, (name, tau) in enumerate(MIROSTAT_REQUESTS)]
    before = preemptions(adaptive_llm)
    alone = [token_ids(adaptive_llm.generate([LONG_PROMPT], params))[0] for params in mirostat]
    assert preemptions(adaptive_llm) == before  # one request at a time fits the cache

    # Behind greedy and plain long requests: 8 requests of ~300 tokens need 24 blocks of 128
    # tokens; the cache has 16, so the scheduler preempts, the latest requests (ours) first.
    plain = [long_sampled(5 + i) for i in range(4)]
    prompts = GREEDY_PROMPTS + [LONG_PROMPT] * (len(plain) + len(mirostat))
    resumed = processor_state(adaptive_llm)["resumed_requests"]
    outputs = adaptive_llm.generate(prompts, [greedy()] * len(GREEDY_PROMPTS) + plain + mirostat)
    assert preemptions(adaptive_llm) > before
    assert processor_state(adaptive_llm)["resumed_requests"] > resumed  # Mirostat states came back

    assert token_ids(outputs[-len(mirostat):]) == alone
    # greedy requests batched with sampled ones are exactly plain vLLM's
    assert token_ids(outputs[: len(GREEDY_PROMPTS)]) == plain_greedy_token_ids
    # each Mirostat request's observed surprise settles on its own target
    for (name, tau), output in zip(MIROSTAT_REQUESTS, outputs[-len(mirostat):]):
        assert len(output.outputs[0].token_ids) == 300
        assert abs(mean_surprise_bits(output) - tau) < 0.5, (name, tau, mean_surprise_bits(output))
    # the plain sampled requests are not truncated: their surprise is far above every target
    for output in outputs[len(GREEDY_PROMPTS) : len(GREEDY_PROMPTS) + len(plain)]:
        assert mean_surprise_bits(output) > 6.0


# Parameters under which each sampler changes the tiny model's (rather flat) distributions.
SAMPLER_ARGS: dict[str, dict[str, float]] = {
    "mirostat_v1": {"mirostat_tau": 3.0, "mirostat_m": 100},
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


RESCALING = {"dynatemp", "edt"}  # rewrite finite logits; the others only mask tokens


def expected_first_step(name: str, tempered: torch.Tensor, temperature: float) -> torch.Tensor:
    """The sampler's float64 reference applied, outside the engine, to the tempered row plain
    vLLM produced (Mirostat at its first step: mu = 2 tau)."""
    row = sampler_reference(name, tempered.float(), SAMPLER_ARGS[name], temperature)
    return torch.log_softmax(row, dim=-1)


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
        if name in RESCALING:
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


# ---- fault injection: a sampler that fails inside the engine --------------------------------


def fault_switch(names: str) -> Callable[[Any], list[str]]:
    """A function for collective_rpc that sets the worker's injected fault points (by value:
    cloudpickle ships a closure's code, so the worker needs no import of this module)."""

    def switch(worker: Any) -> list[str]:
        import os

        from vllm_adaptive.faults import FAULT_INJECT_ENV, injected_faults

        os.environ[FAULT_INJECT_ENV] = names
        injected_faults.cache_clear()
        return sorted(injected_faults())

    return switch


@contextmanager
def injected(llm: LLM, names: str) -> Iterator[None]:
    """Fault points switched on in the engine's worker for the `with` block only."""
    assert llm.collective_rpc(fault_switch(names)) == [sorted(names.split(","))]
    try:
        yield
    finally:
        assert llm.collective_rpc(fault_switch("")) == [[]]


def failure_counts(llm: LLM) -> dict[tuple[str, str], int]:
    return {(f["sampler"], f["stage"]): f["requests"] for f in processor_state(llm)["failure_counts"]}


def fault_batch() -> tuple[list[str], list[SamplingParams], list[SamplingParams]]:
    """Prompts, a batch with one request per sampler plus greedy and plain ones, and the same
    batch with each sampler request replaced by its plain twin (same seed and temperature)."""
    names = list(SAMPLER_ARGS)
    with_sampler, twins = [], []
    for i, name in enumerate(names):
        common = {"temperature": 0.7 + 0.05 * i, "max_tokens": 12, "ignore_eos": True, "seed": 40 + i}
        with_sampler.append(SamplingParams(**common, extra_args={"adaptive_sampler": name, **SAMPLER_ARGS[name]}))
        twins.append(SamplingParams(**common))
    others = [greedy()] * 2 + [SamplingParams(temperature=0.9, max_tokens=12, ignore_eos=True, seed=3)]
    prompts = [LONG_PROMPT] * len(names) + GREEDY_PROMPTS[:2] + [LONG_PROMPT]
    return prompts, with_sampler + others, twins + others


@pytest.mark.parametrize("stage", ["update_state", "apply"])
def test_a_failing_sampler_serves_its_requests_plainly_and_counts(adaptive_llm: LLM, stage: str) -> None:
    """With the fault point sampler:<stage> on, every sampler fails in that stage of the real
    engine: each request is still served, exactly as the same request without a sampler (its
    plain twin), the greedy and plain requests beside it are as in a run without failures,
    the engine keeps serving, and each failed request is counted once, under its sampler."""
    prompts, batch, twins_batch = fault_batch()
    reference = token_ids(adaptive_llm.generate(prompts, twins_batch))
    sampled = token_ids(adaptive_llm.generate(prompts, batch))
    assert sampled[: len(SAMPLER_ARGS)] != reference[: len(SAMPLER_ARGS)]  # samplers change tokens
    before = failure_counts(adaptive_llm)
    with injected(adaptive_llm, f"sampler:{stage}"):
        outputs = adaptive_llm.generate(prompts, batch)
    assert token_ids(outputs) == reference
    after = failure_counts(adaptive_llm)
    assert {kind: after[kind] - before.get(kind, 0) for kind in after if after[kind] != before.get(kind, 0)} == {
        (name, stage): 1 for name in SAMPLER_ARGS
    }
    assert token_ids(adaptive_llm.generate(prompts, batch)) == sampled  # fault off: samplers back
