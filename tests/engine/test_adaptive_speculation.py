"""Adaptive draft length in a real vLLM engine (offline `LLM` on CPU), issue #5.

Each engine runs the same workload once (reference.spec_workload: 8 concurrent prompts, greedy
then seeded sampling), reports vLLM's spec-decode counters and the adaptive proposer's state,
and shuts down before the next starts: one engine at a time. Plain-vLLM runs happen in a
subprocess with VLLM_PLUGINS="" so that nothing of the plugin is loaded there.

Models: the target is the suite's tiny random model; the draft is its first layer with the same
embeddings and LM head (tests/draft_models.py), so the two agree on some tokens and not others.
The random models' distributions are nearly flat (draft entropy ~6.2-6.4 nats, ln V = 6.93),
so the entropy threshold below sits inside that range: the rule then stops some drafts early
and lets others run, which is what the tests need to see. The trained pair, when it is cached,
gives real figures.

The default configuration (`speculative: {enabled: true}`: SpecDec++ with the goodput controller)
runs with the contrary draft (tests/draft_models.py), which the target never accepts: what the
controller and the stop rule must do then follows from the draft alone, not from the machine's
speed (see `default_configuration`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vllm import LLM

import vllm_adaptive
import draft_models
from draft_models import ensure_contrary_draft, ensure_truncated_draft
from reference import ENGINE_ARGS, SPEC_PROMPTS, spec_workload
from vllm_processes import plain_run
from vllm_adaptive.introspection import adaptive_worker_state
from vllm_adaptive.speculative.config import AdaptiveDraftConfig, initial_k

pytestmark = pytest.mark.engine

K_MAX = 4
# 64 MiB of KV cache: plenty for 8 requests of ~60 tokens, small beside the other job here.
ENGINE = {**ENGINE_ARGS, "kv_cache_memory_bytes": 64 << 20, "disable_log_stats": False}
ENTROPY_RULE = {"enabled": True, "max_draft_tokens": K_MAX, "stop_rule": "entropy",
                "entropy_threshold": 6.3, "controller": False}


def speculative_config(draft: Path, k: int = K_MAX) -> dict[str, Any]:
    return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": k}


def plugin_run(model: Path, config: dict[str, Any], workload: dict[str, Any] | None = None,
               **engine_args: Any) -> dict[str, Any]:
    """reference.spec_workload with the plugin on, plus the adaptive proposer's state."""
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable
    llm = LLM(str(model), **vllm_adaptive.engine_kwargs(config, **{**ENGINE, **engine_args}))
    try:
        result = spec_workload(llm, **(workload or {}))
        [state] = llm.collective_rpc(adaptive_worker_state)
        result["speculative"] = state["speculative"]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return result


class Runs:
    """Each engine configuration runs once per module, when a test first needs it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._done: dict[str, dict[str, Any]] = {}

    def get(self, name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name not in self._done:
            self._done[name] = run()
            # kept for a reader of a failure (pytest --basetemp)
            (self.folder / f"{name}.json").write_text(json.dumps(self._done[name], indent=1))
        return self._done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("speculation"))


@pytest.fixture(scope="module")
def draft_model(tiny_model: Path) -> Path:
    return ensure_truncated_draft(tiny_model, num_layers=1)


@pytest.fixture(scope="module")
def no_speculation(runs: Runs, tiny_model: Path) -> dict[str, Any]:
    return runs.get("none", lambda: plain_run(tiny_model, ENGINE, runs.folder / "none.json"))


@pytest.fixture(scope="module")
def vllm_speculation(runs: Runs, tiny_model: Path, draft_model: Path) -> dict[str, Any]:
    """vLLM's own draft-model speculation, fixed K."""
    args = {**ENGINE, "speculative_config": speculative_config(draft_model)}
    return runs.get("vllm", lambda: plain_run(tiny_model, args, runs.folder / "vllm.json"))


@pytest.fixture(scope="module")
def adaptive(runs: Runs, tiny_model: Path, draft_model: Path) -> dict[str, Any]:
    return runs.get("adaptive", lambda: plugin_run(
        tiny_model, {"speculative": ENTROPY_RULE}, speculative_config=speculative_config(draft_model)))


@pytest.fixture(scope="module")
def adaptive_off(runs: Runs, tiny_model: Path, draft_model: Path) -> dict[str, Any]:
    """The plugin on, speculative.enabled false, vLLM's draft-model speculation."""
    return runs.get("adaptive-off", lambda: plugin_run(
        tiny_model, {}, speculative_config=speculative_config(draft_model)))


def test_adaptive_greedy_outputs_equal_outputs_without_speculation(
    adaptive: dict[str, Any], no_speculation: dict[str, Any]
) -> None:
    assert [len(t) for t in adaptive["greedy"]] == [48] * len(SPEC_PROMPTS)
    assert adaptive["greedy"] == no_speculation["greedy"]


def test_adaptive_drafts_have_varying_lengths_and_end_early(adaptive: dict[str, Any]) -> None:
    state = adaptive["speculative"]
    assert state["enabled"] is True and state["stop_rule"] == "entropy"
    counters = state["counters"]
    assert counters["failures"] == 0
    histogram = counters["length_histogram"]
    assert len(histogram) == K_MAX + 1
    # more than one draft length occurred, among them some shorter than K_max
    assert sum(1 for n in histogram if n > 0) >= 2, histogram
    assert sum(histogram[:K_MAX]) > 0, histogram
    assert 0 < state["mean_draft_length"] < K_MAX
    # every row stopped before K_max in some steps: the draft loop ended early there
    assert counters["early_exits"] > 0
    assert counters["draft_passes"] < counters["proposals"] * K_MAX


def test_adaptive_acceptance_feedback_matches_vllm_counters(adaptive: dict[str, Any]) -> None:
    """The proposer's view of verification (its drafts, matched to what the scheduler kept)
    agrees with the counts vLLM's scheduler reports."""
    counters, metrics = adaptive["speculative"]["counters"], adaptive["spec_metrics"]
    assert counters["verified_drafts"] == metrics["vllm:spec_decode_num_drafts"]
    assert counters["verified_tokens"] == metrics["vllm:spec_decode_num_draft_tokens"]
    assert counters["accepted_tokens"] == metrics["vllm:spec_decode_num_accepted_tokens"]
    # the drafts vLLM verified are shorter than K_max on average
    assert metrics["vllm:spec_decode_num_draft_tokens"] < K_MAX * metrics["vllm:spec_decode_num_drafts"]


def test_adaptive_sampled_requests_complete(adaptive: dict[str, Any]) -> None:
    assert [len(t) for t in adaptive["sampled"]] == [48] * len(SPEC_PROMPTS)


def test_plugin_with_adaptive_drafting_off_is_vllms_draft_model_speculation(
    adaptive_off: dict[str, Any], vllm_speculation: dict[str, Any], no_speculation: dict[str, Any]
) -> None:
    assert adaptive_off["speculative"] == {"enabled": False}
    assert adaptive_off["greedy"] == vllm_speculation["greedy"] == no_speculation["greedy"]
    # the same drafts, verified the same way, position by position: K_max tokens every time
    metrics = vllm_speculation["greedy_metrics"]
    assert adaptive_off["greedy_metrics"] == metrics
    assert metrics["vllm:spec_decode_num_draft_tokens"] == K_MAX * metrics["vllm:spec_decode_num_drafts"]
    assert [len(t) for t in adaptive_off["sampled"]] == [48] * len(SPEC_PROMPTS)


# --- the default configuration: SpecDec++ with the goodput controller ----------------------

DEFAULTS = AdaptiveDraftConfig(enabled=True)


@pytest.fixture(scope="module")
def default_configuration(runs: Runs, tiny_model: Path) -> dict[str, Any]:
    """`speculative: {enabled: true}` with the contrary draft, which is sure of a token the target
    never chooses. Then, whatever the machine's speed:

    - the controller keeps its initial K until it has `controller_min_samples` timings of each
      kind (the warm-up), then prices every K at zero accepted tokens, so a smaller K has a
      shorter step and the same tokens: it must go to 0 as soon as K's extra draft passes
      (whole forward passes of a model as large as the target) cost more than `margin` of a step;
    - the stop rule starts from the calibrator's prior (acceptance = the draft's confidence,
      near 1) and drafts to the cap; after the first verifications the calibrator has seen
      confident tokens rejected, and the rule stops drafts early, within the warm-up.
    """
    draft = ensure_contrary_draft(tiny_model)
    return runs.get("default-configuration", lambda: plugin_run(
        tiny_model, {"speculative": {"enabled": True}},
        speculative_config=speculative_config(draft, DEFAULTS.max_draft_tokens)))


def test_default_configuration_is_specdec_with_the_goodput_controller(
    default_configuration: dict[str, Any]
) -> None:
    state = default_configuration["speculative"]
    assert state["enabled"] is True and state["stop_rule"] == "specdec"
    assert state["config"]["controller"] is True and state["config"]["specdec_threshold"] == "auto"
    assert state["counters"]["failures"] == 0


def test_default_configuration_greedy_outputs_equal_outputs_without_speculation(
    default_configuration: dict[str, Any], no_speculation: dict[str, Any]
) -> None:
    assert default_configuration["greedy"] == no_speculation["greedy"]
    # the contrary draft is as the test means it: greedy verification accepted none of its tokens
    metrics = default_configuration["greedy_metrics"]
    assert metrics["vllm:spec_decode_num_draft_tokens"] > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"] == 0


def test_default_configuration_controller_ends_speculation_for_a_draft_never_accepted(
    default_configuration: dict[str, Any]
) -> None:
    state = default_configuration["speculative"]
    caps = state["counters"]["cap_histogram"]
    start = initial_k(DEFAULTS)
    assert start > 0
    # the warm-up ran at the initial K, then the controller moved K to 0 and kept it there
    assert caps[start] >= DEFAULTS.controller_min_samples, caps
    assert caps[0] > 0, caps
    assert state["controller_k"] == 0
    assert sum(caps) == state["counters"]["proposals"]


def test_default_configuration_stop_rule_ends_drafts_before_the_cap(
    default_configuration: dict[str, Any]
) -> None:
    state = default_configuration["speculative"]
    counters = state["counters"]
    start = initial_k(DEFAULTS)
    assert counters["rule_stops"] > 0
    # every row stopped before the cap in some steps, so the draft loop ended early there
    assert counters["early_exits"] > 0
    lengths = counters["length_histogram"]
    assert lengths[start] > 0 and sum(lengths[1:start]) > 0, lengths  # drafts to the cap, and shorter
    # the calibrator learned that the draft's confident tokens are rejected
    assert min(state["calibration"][-3:]) < 0.5, state["calibration"]


# --- the trained pair (benchmarks/models), in the default configuration but for K ------------

TRAINED_K_MAX = 6
TRAINED_MAX_TOKENS = 64
# The trained target is 60 layers deep: at max_model_len 1024, float32, one request's KV cache
# alone is ~64 MiB (60 layers x 4 KV heads x 32 x 2 x 4 bytes per token), so ENGINE's 64 MiB
# leaves no room; 256 MiB holds the 8 prompts of the workload with their drafts.
TRAINED_ENGINE = {**ENGINE, "kv_cache_memory_bytes": 256 << 20}
SPECDEC_RULE = {"enabled": True, "max_draft_tokens": TRAINED_K_MAX, "stop_rule": "specdec"}


@pytest.fixture(scope="module")
def trained_pair() -> dict[str, Path]:
    return draft_models.trained_pair()


@pytest.fixture(scope="module")
def trained_workload() -> dict[str, Any]:
    from benchmarks.tasks.mixture import eval_examples

    prompts = [e.prompt for task in ("arith", "text") for e in eval_examples(task, n=4)]
    return {"prompts": prompts, "max_tokens": TRAINED_MAX_TOKENS}


@pytest.fixture(scope="module")
def trained_no_speculation(runs: Runs, trained_pair: dict[str, Path], trained_workload: dict[str, Any]) -> dict[str, Any]:
    return runs.get("trained-none", lambda: plain_run(
        trained_pair["target"], TRAINED_ENGINE, runs.folder / "trained-none.json", **trained_workload))


@pytest.fixture(scope="module")
def trained_adaptive(runs: Runs, trained_pair: dict[str, Path], trained_workload: dict[str, Any]) -> dict[str, Any]:
    return runs.get("trained-adaptive", lambda: plugin_run(
        trained_pair["target"], {"speculative": SPECDEC_RULE}, trained_workload,
        kv_cache_memory_bytes=TRAINED_ENGINE["kv_cache_memory_bytes"],
        speculative_config=speculative_config(trained_pair["draft"], TRAINED_K_MAX)))


def test_trained_pair_greedy_outputs_equal_outputs_without_speculation(
    trained_adaptive: dict[str, Any], trained_no_speculation: dict[str, Any]
) -> None:
    assert trained_adaptive["greedy"] == trained_no_speculation["greedy"]


def test_trained_pair_drafts_follow_the_calibrated_acceptance(trained_adaptive: dict[str, Any]) -> None:
    state = trained_adaptive["speculative"]
    counters, metrics = state["counters"], trained_adaptive["spec_metrics"]
    assert state["stop_rule"] == "specdec" and counters["failures"] == 0
    assert state["config"]["controller"] is True and state["controller_k"] is not None
    assert sum(1 for n in counters["length_histogram"] if n > 0) >= 2, counters["length_histogram"]
    assert counters["accepted_tokens"] == metrics["vllm:spec_decode_num_accepted_tokens"]
    assert counters["verified_tokens"] == metrics["vllm:spec_decode_num_draft_tokens"]
    assert 0.0 < state["acceptance_rate"] < 1.0
