"""`vllm serve` whose adaptive stop rule fails at every draft step (VLLM_ADAPTIVE_FAULT_INJECT).

The server is the one of test_speculative_server.py (the tiny target, its first layer as the
draft, the entropy rule, controller off) started with `spec:stop_rule` injected
(vllm_adaptive.faults). Every step's first draft step then fails inside the worker: the requests
must still be served over HTTP with plain vLLM's greedy tokens, each failure must show on
`/metrics` under its stage, and the step must draft as vLLM does (K tokens per request).
Each stage's fallback is tested offline in tests/engine/test_speculative_faults.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from draft_models import ensure_truncated_draft
from test_speculative_server import CONFIG, K_MAX, generate, settled
from vllm_adaptive.faults import FAULT_INJECT_ENV
from vllm_adaptive.speculative.policy import FAILURE_STAGES
from vllm_processes import Server, start_server, stop_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def failing_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("speculative-faults-server")
    config = folder / "adaptive.yaml"
    config.write_text(CONFIG)
    draft = ensure_truncated_draft(tiny_model, num_layers=1)
    speculative = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": K_MAX}
    server = start_server(tiny_model, ["--plugin", "adaptive", "--adaptive-config", str(config),
                                       "--speculative-config", json.dumps(speculative)], folder / "server.log",
                          env={FAULT_INJECT_ENV: "spec:stop_rule"})
    yield server
    stop_server(server)


def test_a_failing_stop_rule_is_served_losslessly_and_counted_on_metrics(
    failing_server: Server, plain_greedy_token_ids: list[list[int]]
) -> None:
    before = settled(failing_server)
    assert generate(failing_server) == plain_greedy_token_ids
    after = settled(failing_server)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = sum(delta(f'vllm_adaptive:spec_controller_decisions_total{{k="{k}"}}') for k in range(K_MAX + 1))
    failures = {stage: delta(f'vllm_adaptive:spec_failures_total{{stage="{stage}"}}') for stage in FAILURE_STAGES}
    # every step that drafted failed once, at the stop rule, and at no other stage
    assert steps > 0 and failures == {s: steps if s == "stop_rule" else 0.0 for s in FAILURE_STAGES}, failures
    # and its drafts were vLLM's: K_MAX tokens for every request
    drafts = delta("vllm:spec_decode_num_drafts_total")
    assert drafts > 0 and delta("vllm:spec_decode_num_draft_tokens_total") == K_MAX * drafts
    assert delta("vllm_adaptive:spec_draft_tokens_total") == 0  # no adaptive drafts reached the scheduler
    assert "fault injected at 'spec:stop_rule'" in failing_server.log_tail(200_000)
