"""`vllm serve` with Entropy Adaptive Decoding (issue #16): admission, routed completions, /metrics.

One server: the tiny random target, its first layer as the small (draft) model
(tests/draft_models.py), `--plugin adaptive` with `routing.enabled` in faithful mode. The tiny
draft's entropies are 8-10 bits, so tau 1e6 is above every one of them (the small model writes
every token after the target's first) and tau 1e-4 below every one (the large model writes every
token). The routing itself is tested offline (tests/engine/test_ead_routing.py, and each fallback
in tests/engine/test_ead_faults.py); here: what a client sees over HTTP, and what `/metrics`
shows of it.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from draft_models import ensure_truncated_draft
from reference import GREEDY_PROMPTS
from vllm_adaptive.routing.policy import FAILURE_STAGES, STINT_BUCKETS
from vllm_processes import Server, start_server, stop_server

pytestmark = pytest.mark.server

K = 4
CONFIG = "routing:\n  enabled: true\n  mode: faithful\n"
# Not a multiple of K: the last step emits more than the request keeps.
MAX_TOKENS = 21
PROMPTS = GREEDY_PROMPTS[:2]
HIGH = {"ead": True, "ead_tau": 1e6}
LOW = {"ead": True, "ead_tau": 1e-4, "ead_min_stint": 0}
# Every sample of the ead_* families (labels in Prometheus' text format).
EAD_SAMPLES = (
    ["vllm_adaptive:ead_requests_total",
     'vllm_adaptive:ead_tokens_total{model="small"}', 'vllm_adaptive:ead_tokens_total{model="large"}',
     "vllm_adaptive:ead_large_fraction",
     'vllm_adaptive:ead_switches_total{to="large"}', 'vllm_adaptive:ead_switches_total{to="small"}']
    + [f'vllm_adaptive:ead_stint_length_bucket{{le="{float(b)}"}}' for b in STINT_BUCKETS]
    + ['vllm_adaptive:ead_stint_length_bucket{le="+Inf"}', "vllm_adaptive:ead_stint_length_count",
       "vllm_adaptive:ead_stint_length_sum",
       "vllm_adaptive:ead_target_passes_total", "vllm_adaptive:ead_draft_passes_total",
       'vllm_adaptive:ead_positions_total{outcome="forced"}',
       'vllm_adaptive:ead_positions_total{outcome="vetoed"}',
       "vllm_adaptive:ead_bonus_dropped_total", "vllm_adaptive:ead_plan_mismatches_total"]
    + [f'vllm_adaptive:ead_failures_total{{stage="{stage}"}}' for stage in FAILURE_STAGES]
)


@pytest.fixture(scope="module")
def ead_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("ead-server")
    config = folder / "adaptive.yaml"
    config.write_text(CONFIG)
    draft = ensure_truncated_draft(tiny_model, num_layers=1)
    speculative = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K}
    server = start_server(tiny_model, [
        "--plugin", "adaptive", "--adaptive-config", str(config),
        "--speculative-config", json.dumps(speculative),
        "--kv-cache-memory-bytes", str(256 << 20),  # after start_server's own: this one wins
    ], folder / "server.log")
    yield server
    stop_server(server)


def complete(server: Server, prompt: str = "Hello", xargs: dict[str, Any] | None = None,
             **body: Any) -> requests.Response:
    payload = {"model": server.model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
               "ignore_eos": True, "return_token_ids": True, **body}
    if xargs is not None:
        payload["vllm_xargs"] = xargs
    return requests.post(f"{server.url}/v1/completions", json=payload, timeout=120)


def scrape(server: Server) -> dict[str, float]:
    """`name{labels}` -> value for every vllm_adaptive:ead_* sample."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(vllm_adaptive:ead_\S*?)(\{[^}]*\})? (\S+)$", line)
        if match:
            samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return samples


def settled(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """The ead_* figures once two scrapes 0.6 s apart agree: the worker writes its snapshot
    from a background thread within 0.5 s of a change, and no request is in flight here."""
    deadline = time.monotonic() + timeout
    latest = scrape(server)
    while time.monotonic() < deadline:
        time.sleep(0.6)
        previous, latest = latest, scrape(server)
        if latest == previous:
            return latest
    raise AssertionError(f"/metrics kept changing for {timeout} s")


def assert_still_serving(server: Server) -> None:
    for xargs in (None, LOW):
        response = complete(server, max_tokens=4, xargs=xargs)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("xargs", "parameter", "fragments"),
    [
        ({"ead": True, "ead_tau": -1}, "ead_tau", ["ead_tau", "(0, inf)", "got -1"]),
        ({"ead": True, "ead_window": 0}, "ead_window", ["ead_window", "[1, 32]", "got 0"]),
        ({"ead": True, "ead_mode": "fast"}, "ead_mode",
         ["ead_mode", "['faithful', 'speculative']", "got 'fast'"]),
        ({"ead": "maybe"}, "ead", ["ead must be", "true or false", "got 'maybe'"]),
    ],
)
def test_bad_ead_values_get_400_naming_key_range_and_value(
    ead_server: Server, xargs: dict[str, Any], parameter: str, fragments: list[str]
) -> None:
    response = complete(ead_server, xargs=xargs)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == parameter
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    assert_still_serving(ead_server)


def test_sampling_an_ead_request_gets_400_since_the_small_model_drafts_greedily(ead_server: Server) -> None:
    response = complete(ead_server, xargs={"ead": True}, temperature=0.7)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "temperature"
    assert "temperature=0.7" in error["message"], error["message"]
    assert "draft_sample_method is 'greedy'" in error["message"], error["message"]
    assert_still_serving(ead_server)


@pytest.fixture(scope="module")
def ead_completions(ead_server: Server) -> dict[str, Any]:
    """Each prompt at tau 1e6, at tau 1e-4 and without EAD, one request at a time, and the
    ead_* figures settled before and after."""
    before = settled(ead_server)
    results: dict[str, list[dict[str, Any]]] = {"high": [], "low": [], "plain": []}
    for prompt in PROMPTS:
        for name, xargs in (("high", HIGH), ("low", LOW), ("plain", None)):
            response = complete(ead_server, prompt=prompt, xargs=xargs)
            assert response.status_code == 200, response.text
            results[name].append(response.json())
    return {**results, "before": before, "after": settled(ead_server)}


def token_ids(responses: list[dict[str, Any]]) -> list[list[int]]:
    return [r["choices"][0]["token_ids"] for r in responses]


def completion_tokens(responses: list[dict[str, Any]]) -> int:
    return sum(r["usage"]["completion_tokens"] for r in responses)


def test_ead_completions_are_served_in_full(ead_completions: dict[str, Any]) -> None:
    for name in ("high", "low", "plain"):
        assert [len(t) for t in token_ids(ead_completions[name])] == [MAX_TOKENS] * len(PROMPTS), name
        assert completion_tokens(ead_completions[name]) == MAX_TOKENS * len(PROMPTS), name


def test_a_tau_below_every_entropy_equals_the_request_without_ead(ead_completions: dict[str, Any]) -> None:
    assert token_ids(ead_completions["low"]) == token_ids(ead_completions["plain"])


def test_metrics_show_every_ead_family_and_count_every_token(ead_completions: dict[str, Any]) -> None:
    before, after = ead_completions["before"], ead_completions["after"]
    missing = [name for name in EAD_SAMPLES if name not in after]
    assert not missing, missing

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    small = delta('vllm_adaptive:ead_tokens_total{model="small"}')
    large = delta('vllm_adaptive:ead_tokens_total{model="large"}')
    sent = ead_completions["high"] + ead_completions["low"]
    assert small + large == completion_tokens(sent)
    # tau 1e6: the target writes the first token, the small model the rest; tau 1e-4: the target
    # writes every token.
    assert small == (MAX_TOKENS - 1) * len(PROMPTS)
    assert large == len(PROMPTS) + MAX_TOKENS * len(PROMPTS)
    assert delta("vllm_adaptive:ead_requests_total") == len(sent)
    assert 0.0 < after["vllm_adaptive:ead_large_fraction"] < 1.0
    # Faithful mode: at tau 1e6 one target pass for the first token, then one per K small-model
    # tokens; at tau 1e-4 one per token.
    passes = (1 + math.ceil((MAX_TOKENS - 1) / K)) * len(PROMPTS) + MAX_TOKENS * len(PROMPTS)
    assert delta("vllm_adaptive:ead_target_passes_total") == passes
    assert delta('vllm_adaptive:ead_positions_total{outcome="forced"}') >= small
    failures = {stage: delta(f'vllm_adaptive:ead_failures_total{{stage="{stage}"}}') for stage in FAILURE_STAGES}
    assert failures == dict.fromkeys(FAILURE_STAGES, 0.0)
