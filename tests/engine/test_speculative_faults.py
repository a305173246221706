"""Each fallback of the adaptive proposer, forced in a real vLLM engine (offline `LLM` on CPU).

The proposer catches failures at four stages of a step (vllm_adaptive.speculative.policy
FAILURE_STAGES) and degrades that step to vLLM's own drafting. Here each stage is made to fail
through its fault point (vllm_adaptive.faults) while greedy requests run, and each test checks
that the requests are served in full, that their tokens equal plain vLLM's (lossless), that the
failure is counted under that stage and no other, and that the step drafted as the proposer's
docstring says.

One engine serves every case: before each, the test names the fault in the worker process
(`inject_faults`, through `LLM.collective_rpc`: it sets VLLM_ADAPTIVE_FAULT_INJECT there and
drops the cached reading), so the engine starts once. Its configuration makes every step run
every stage, whatever the machine's speed: the controller is on but its warm-up never ends
(controller_min_samples 10000), so K stays at its initial value K_MAX, and the entropy rule's
threshold (as in test_adaptive_speculation.py) stops some drafts before K_MAX.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vllm import LLM, SamplingParams

import vllm_adaptive
from draft_models import ensure_truncated_draft
from reference import ENGINE_ARGS, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, spec_metrics
from vllm_adaptive.faults import FAULT_INJECT_ENV, injected_faults
from vllm_adaptive.introspection import adaptive_worker_state
from vllm_adaptive.speculative.policy import FAILURE_STAGES

pytestmark = pytest.mark.engine

K_MAX = 4
CONFIG = {"speculative": {"enabled": True, "max_draft_tokens": K_MAX, "stop_rule": "entropy",
                          "entropy_threshold": 6.3, "controller": True, "controller_min_samples": 10_000}}
ENGINE = {**ENGINE_ARGS, "kv_cache_memory_bytes": 64 << 20, "disable_log_stats": False}


def inject_faults(worker: Any, names: str) -> list[str]:
    """In the worker process: inject the faults `names` (comma-separated) from now on."""
    os.environ[FAULT_INJECT_ENV] = names
    injected_faults.cache_clear()
    return sorted(injected_faults())


@pytest.fixture(scope="module")
def llm(tiny_model: Path) -> Iterator[LLM]:
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable
    draft = ensure_truncated_draft(tiny_model, num_layers=1)
    speculative = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K_MAX}
    engine = LLM(str(tiny_model), **vllm_adaptive.engine_kwargs(CONFIG, **ENGINE, speculative_config=speculative))
    yield engine
    engine.llm_engine.engine_core.shutdown()


def counters(llm: LLM) -> dict[str, Any]:
    [state] = llm.collective_rpc(adaptive_worker_state)
    assert state["speculative"]["enabled"] is True
    return state["speculative"]["counters"]


def run_with_fault(llm: LLM, fault: str) -> dict[str, Any]:
    """The greedy prompts with `fault` injected ("" for none): their token ids, and what the
    proposer's counters and vLLM's spec-decode counters gained meanwhile."""
    assert llm.collective_rpc(inject_faults, args=(fault,)) == [[fault] if fault else []]
    try:
        before, vllm_before = counters(llm), spec_metrics(llm)
        params = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
        outputs = llm.generate(GREEDY_PROMPTS, params, use_tqdm=False)
        after, vllm_after = counters(llm), spec_metrics(llm)
    finally:
        llm.collective_rpc(inject_faults, args=("",))
    return {
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "failures": after["failures"] - before["failures"],
        "stages": {s: after["failure_stages"][s] - before["failure_stages"][s] for s in FAILURE_STAGES},
        "proposals": after["proposals"] - before["proposals"],
        "drafts": vllm_after["vllm:spec_decode_num_drafts"] - vllm_before["vllm:spec_decode_num_drafts"],
        "draft_tokens": (vllm_after["vllm:spec_decode_num_draft_tokens"]
                         - vllm_before["vllm:spec_decode_num_draft_tokens"]),
    }


def assert_served_losslessly_and_counted(run: dict[str, Any], stage: str, plain: list[list[int]]) -> None:
    assert run["token_ids"] == plain
    assert run["stages"][stage] > 0, run
    assert run["stages"] == {s: run["stages"][stage] if s == stage else 0 for s in FAILURE_STAGES}, run
    assert run["failures"] == run["stages"][stage]


def test_without_faults_drafts_are_adaptive_and_nothing_fails(
    llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    run = run_with_fault(llm, "")
    assert run["token_ids"] == plain_greedy_token_ids
    assert run["failures"] == 0 and run["proposals"] > 0
    # the entropy rule ended some drafts before K_MAX: what the fallbacks below do not do
    assert 0 < run["draft_tokens"] < K_MAX * run["drafts"], run


def test_a_failing_stop_rule_leaves_the_step_to_vllms_fixed_k_drafts(
    llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    run = run_with_fault(llm, "spec:stop_rule")
    assert_served_losslessly_and_counted(run, "stop_rule", plain_greedy_token_ids)
    assert run["stages"]["stop_rule"] == run["proposals"]  # every step's first draft step failed
    assert run["drafts"] > 0 and run["draft_tokens"] == K_MAX * run["drafts"], run


def test_a_failing_controller_leaves_the_step_to_vllms_fixed_k_drafts(
    llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    run = run_with_fault(llm, "spec:controller")
    assert_served_losslessly_and_counted(run, "controller", plain_greedy_token_ids)
    assert run["proposals"] == 0  # no step got as far as drafting adaptively
    assert run["drafts"] > 0 and run["draft_tokens"] == K_MAX * run["drafts"], run


def test_failing_feedback_leaves_the_step_to_vllms_fixed_k_drafts(
    llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    run = run_with_fault(llm, "spec:feedback")
    assert_served_losslessly_and_counted(run, "feedback", plain_greedy_token_ids)
    # Only the prompts' first step drafts adaptively: it has no verification to learn from, so
    # feedback does not run; every later step has one, fails there, and drafts K_MAX tokens.
    assert run["proposals"] <= 1, run
    first = len(GREEDY_PROMPTS)  # drafts of the first step: 1 to K_MAX tokens each
    assert run["draft_tokens"] >= K_MAX * (run["drafts"] - first) + first, run


def test_a_failing_finish_sends_vllms_fixed_k_drafts_or_none(
    llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    run = run_with_fault(llm, "spec:finish")
    assert_served_losslessly_and_counted(run, "finish", plain_greedy_token_ids)
    assert run["stages"]["finish"] == run["proposals"]  # every step failed once, at its end
    # a step whose loop ran to K_MAX sends vLLM's K_MAX tokens; one that ended early, none
    assert run["drafts"] > 0 and run["draft_tokens"] == K_MAX * run["drafts"], run


def test_adaptive_drafting_resumes_after_the_faults_are_lifted(
    llm: LLM, plain_greedy_token_ids: list[list[int]]
) -> None:
    run = run_with_fault(llm, "")
    assert run["token_ids"] == plain_greedy_token_ids
    assert run["failures"] == 0 and run["proposals"] > 0
    assert 0 < run["draft_tokens"] < K_MAX * run["drafts"], run
