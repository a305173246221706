"""Each fallback of EAD routing (issue #16), forced in a real vLLM engine (offline `LLM` on CPU).

The routed proposer catches failures at the stages of a step (vllm_adaptive.routing.policy
FAILURE_STAGES; the proposer's `_propose_routed` and the gate's `rejection_sample`). Here each
fault point (vllm_adaptive.faults: routing:gate, routing:commit, routing:draft, routing:finish)
is switched on inside the worker while greedy EAD requests run at a tau inside the tiny draft's
entropy range (8-10 bits: tau 9.0, window 1, so both models write and the machine switches), in
faithful and in speculative mode. Each test checks that the requests are served in full, that the
failure is counted under its stage and under no other, and that once the fault is switched off
the engine serves the same requests as it did before any fault.

Where the fallback verifies the step losslessly (gate, draft, finish), every step with an EAD row
fails, so the output is plain vLLM's greedy output token for token and the small model writes
nothing. A failing commit is different: the step still routes, from machine state that did not
learn what the last verification emitted, and forces the small model's tokens where that stale
state says so; its output is not lossless and is not compared.

One engine serves every case; the faults are switched in its worker through `collective_rpc`,
as in test_speculative_faults.py. Plain vLLM's greedy reference runs in a subprocess without the
plugin (tests/plain_vllm_run.py).
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
from reference import ENGINE_ARGS, GREEDY_PROMPTS
from vllm_adaptive.faults import FAULT_INJECT_ENV, injected_faults
from vllm_adaptive.introspection import adaptive_worker_state
from vllm_adaptive.routing.policy import FAILURE_STAGES
from vllm_processes import plain_run

pytestmark = pytest.mark.engine

K = 4
# Not a multiple of K + 1, as in test_ead_routing.py: the last step emits more than is kept.
MAX_TOKENS = 21
ENGINE = {**ENGINE_ARGS, "kv_cache_memory_bytes": 64 << 20, "disable_log_stats": False}
MODES = ("faithful", "speculative")
MIDDLE = {"ead": True, "ead_tau": 9.0, "ead_window": 1}


def inject_faults(worker: Any, names: str) -> list[str]:
    """In the worker process: inject the faults `names` (comma-separated) from now on."""
    os.environ[FAULT_INJECT_ENV] = names
    injected_faults.cache_clear()
    return sorted(injected_faults())


class FaultyEngine:
    """One routed engine; `run` serves the prompts as EAD requests with a fault switched on."""

    def __init__(self, target: Path, draft: Path) -> None:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K}
        self.llm = LLM(str(target), **vllm_adaptive.engine_kwargs(
            {"routing": {"enabled": True, "mode": "faithful"}}, speculative_config=spec, **ENGINE))
        self._clean: dict[str, dict[str, Any]] = {}

    def counters(self) -> dict[str, Any]:
        [state] = self.llm.collective_rpc(adaptive_worker_state)
        return state["routing"]["counters"]

    def run(self, fault: str, mode: str) -> dict[str, Any]:
        """The prompts' token ids with `fault` injected ("" for none), and what the routing
        counters gained meanwhile (`stages`: failures by stage)."""
        assert self.llm.collective_rpc(inject_faults, args=(fault,)) == [[fault] if fault else []]
        try:
            before = self.counters()
            params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    extra_args={**MIDDLE, "ead_mode": mode})
            outputs = self.llm.generate(GREEDY_PROMPTS, params, use_tqdm=False)
            after = self.counters()
        finally:
            self.llm.collective_rpc(inject_faults, args=("",))
        delta = {k: after[k] - before[k] for k, v in after.items() if isinstance(v, int)}
        delta["stages"] = {s: after["failure_stages"][s] - before["failure_stages"][s]
                           for s in FAILURE_STAGES}
        return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "counters": delta}

    def clean(self, mode: str) -> dict[str, Any]:
        """The first run without a fault in `mode` (the reference for the runs after one)."""
        if mode not in self._clean:
            self._clean[mode] = self.run("", mode)
        return self._clean[mode]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def plain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    out = tmp_path_factory.mktemp("ead-faults") / "plain.json"
    return plain_run(tiny_model, ENGINE, out, prompts=GREEDY_PROMPTS, max_tokens=MAX_TOKENS)["greedy"]


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[FaultyEngine]:
    engine = FaultyEngine(tiny_model, ensure_truncated_draft(tiny_model, 1))
    engine.clean("faithful")  # before any fault
    engine.clean("speculative")
    yield engine
    engine.close()


def assert_served_in_full(run: dict[str, Any]) -> None:
    assert [len(t) for t in run["tokens"]] == [MAX_TOKENS] * len(GREEDY_PROMPTS)


def assert_counted_under(run: dict[str, Any], stage: str) -> None:
    stages = run["counters"]["stages"]
    assert stages[stage] > 0, run["counters"]
    assert stages == {s: stages[stage] if s == stage else 0 for s in FAILURE_STAGES}, stages
    assert run["counters"]["failures"] == stages[stage]


def assert_lossless(run: dict[str, Any], plain: list[list[int]]) -> None:
    """Plain vLLM's tokens, every one written by the large model."""
    assert run["tokens"] == plain
    counters = run["counters"]
    assert counters["small_tokens"] == 0 and counters["forced_positions"] == 0, counters
    assert counters["large_tokens"] == MAX_TOKENS * len(GREEDY_PROMPTS), counters


def assert_serves_as_before_after_the_fault(engine: FaultyEngine, mode: str) -> None:
    run = engine.run("", mode)
    assert run["tokens"] == engine.clean(mode)["tokens"]
    assert run["counters"]["failures"] == 0, run["counters"]
    assert run["counters"]["small_tokens"] > 0, run["counters"]  # routing again


@pytest.mark.parametrize("mode", MODES)
def test_without_faults_both_models_write_and_nothing_fails(engine: FaultyEngine, mode: str) -> None:
    run = engine.clean(mode)
    assert_served_in_full(run)
    counters = run["counters"]
    assert counters["failures"] == 0, counters
    assert counters["small_tokens"] > 0 and counters["large_tokens"] > len(GREEDY_PROMPTS), counters
    assert counters["small_tokens"] + counters["large_tokens"] == MAX_TOKENS * len(GREEDY_PROMPTS)


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_gate_verifies_the_step_losslessly(
    engine: FaultyEngine, plain: list[list[int]], mode: str
) -> None:
    run = engine.run("routing:gate", mode)
    assert_served_in_full(run)
    assert_counted_under(run, "gate")
    assert_lossless(run, plain)
    assert run["counters"]["bonus_dropped"] == 0  # vLLM's own verification kept every bonus
    assert_serves_as_before_after_the_fault(engine, mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_draft_step_leaves_the_step_to_vllms_drafts(
    engine: FaultyEngine, plain: list[list[int]], mode: str
) -> None:
    run = engine.run("routing:draft", mode)
    assert_served_in_full(run)
    assert_counted_under(run, "draft")
    assert_lossless(run, plain)
    # Each failing step went on with vLLM's draft loop to K passes.
    assert run["counters"]["draft_passes"] == K * run["counters"]["stages"]["draft"]
    assert_serves_as_before_after_the_fault(engine, mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_finish_leaves_the_step_to_vllms_drafts_or_none(
    engine: FaultyEngine, plain: list[list[int]], mode: str
) -> None:
    run = engine.run("routing:finish", mode)
    assert_served_in_full(run)
    assert_counted_under(run, "finish")
    assert_lossless(run, plain)
    failed_steps = run["counters"]["stages"]["finish"]  # each drafted 1 to K passes first
    assert failed_steps <= run["counters"]["draft_passes"] <= K * failed_steps
    assert_serves_as_before_after_the_fault(engine, mode)


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_commit_is_served_in_full_and_counted(engine: FaultyEngine, mode: str) -> None:
    """Not lossless: the step still routes, from stale machine state (module docstring)."""
    run = engine.run("routing:commit", mode)
    assert_served_in_full(run)
    assert_counted_under(run, "commit")
    assert run["counters"]["draft_passes"] > 0  # the steps went on to draft and plan
    assert_serves_as_before_after_the_fault(engine, mode)
