"""`vllm serve` with adaptive draft length (issue #5): served over HTTP, figures on `/metrics`.

The server speculates with vLLM's draft-model method (the tiny random target, its first layer as
the draft: tests/draft_models.py) and `--plugin adaptive` with `speculative.enabled: true`; the
entropy rule's threshold sits inside the random draft's entropy range (as in
tests/engine/test_adaptive_speculation.py) so drafts of several lengths occur.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from draft_models import ensure_truncated_draft
from reference import GREEDY_MAX_TOKENS, GREEDY_PROMPTS
from vllm_adaptive.speculative.policy import FAILURE_STAGES
from vllm_processes import Server, start_server, stop_server

pytestmark = pytest.mark.server

K_MAX = 4
CONFIG = f"""speculative:
  enabled: true
  max_draft_tokens: {K_MAX}
  stop_rule: entropy
  entropy_threshold: 6.3
  controller: false
"""


@pytest.fixture(scope="module")
def speculative_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("speculative-server")
    config = folder / "adaptive.yaml"
    config.write_text(CONFIG)
    draft = ensure_truncated_draft(tiny_model, num_layers=1)
    speculative = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K_MAX}
    server = start_server(tiny_model, ["--plugin", "adaptive", "--adaptive-config", str(config),
                                       "--speculative-config", json.dumps(speculative)], folder / "server.log")
    yield server
    stop_server(server)


def scrape(server: Server) -> dict[str, float]:
    """`name{labels}` -> value for every vllm_adaptive:spec_* and vllm:spec_decode_* sample."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^((?:vllm_adaptive:spec_|vllm:spec_decode_)\S*?)(\{[^}]*\})? (\S+)$", line)
        if match:
            labels = re.sub(r',?engine="\d+"|,?model_name="[^"]*"', "", match.group(2) or "").replace("{,", "{")
            samples[match.group(1) + ("" if labels in ("", "{}") else labels)] = float(match.group(3))
    return samples


def settled(server: Server, timeout: float = 30.0) -> dict[str, float]:
    """The figures once they stop changing: workers write theirs from a background thread at
    most every 0.5 s, so a scrape right after a request may not show it yet."""
    deadline = time.monotonic() + timeout
    latest = scrape(server)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        previous, latest = latest, scrape(server)
        # NaN (the acceptance rate before any verification) equals itself here
        if latest.keys() == previous.keys() and all(
                latest[k] == previous[k] or (math.isnan(latest[k]) and math.isnan(previous[k])) for k in latest):
            return latest
    raise AssertionError(f"/metrics kept changing for {timeout} s")


def generate(server: Server) -> list[list[int]]:
    token_ids = []
    for prompt in GREEDY_PROMPTS:
        response = requests.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": server.model, "prompt": prompt, "max_tokens": GREEDY_MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True})
        assert response.status_code == 200, response.text
        token_ids.append(response.json()["choices"][0]["token_ids"])
    return token_ids


def test_requests_are_served_with_adaptive_drafting(speculative_server: Server) -> None:
    """Greedy equality with no speculation is tested on the offline engine
    (tests/engine/test_adaptive_speculation.py); here: served over HTTP, full length."""
    assert [len(t) for t in generate(speculative_server)] == [GREEDY_MAX_TOKENS] * len(GREEDY_PROMPTS)


def test_metrics_report_draft_lengths_acceptance_stop_rule_and_controller(speculative_server: Server) -> None:
    before = settled(speculative_server)
    generate(speculative_server)
    after = settled(speculative_server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    rows = delta("vllm_adaptive:spec_draft_length_count")
    assert rows > 0, after
    lengths = [delta(f'vllm_adaptive:spec_draft_length_bucket{{le="{float(k)}"}}') for k in range(K_MAX + 1)]
    per_length = [lengths[0]] + [b - a for a, b in zip(lengths, lengths[1:])]
    assert sum(per_length) == rows and lengths[-1] == rows
    assert sum(1 for n in per_length if n > 0) >= 2, per_length  # several draft lengths occurred
    assert per_length[K_MAX] < rows  # and some drafts stopped before K_max
    # The proposer's view of verification equals vLLM's own spec-decode counters.
    assert delta("vllm_adaptive:spec_accepted_draft_tokens_total") == delta("vllm:spec_decode_num_accepted_tokens_total")
    assert delta("vllm_adaptive:spec_verified_draft_tokens_total") == delta("vllm:spec_decode_num_draft_tokens_total")
    assert 0.0 <= after["vllm_adaptive:spec_acceptance_rate"] <= 1.0
    fired = delta('vllm_adaptive:spec_draft_ends_total{reason="stop_rule",stop_rule="entropy"}')
    capped = delta('vllm_adaptive:spec_draft_ends_total{reason="cap",stop_rule="entropy"}')
    assert fired > 0 and fired + capped == rows
    assert capped == per_length[K_MAX]
    # Controller off: every step ran with the cap K_max.
    steps = sum(delta(f'vllm_adaptive:spec_controller_decisions_total{{k="{k}"}}') for k in range(K_MAX + 1))
    assert steps > 0 and delta(f'vllm_adaptive:spec_controller_decisions_total{{k="{K_MAX}"}}') == steps
    assert "vllm_adaptive:spec_controller_cap" not in after
    # no failures, at any stage (each stage has its series, at 0)
    stages = [f'vllm_adaptive:spec_failures_total{{stage="{stage}"}}' for stage in FAILURE_STAGES]
    assert all(name in after and delta(name) == 0 for name in stages), after
