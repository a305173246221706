"""A sampler that fails inside a real `vllm serve --plugin adaptive`: the request is served, and
the failure shows on the server's `/metrics` as `vllm_adaptive:sampler_failures_total`.

The server runs with the fault point `sampler:apply` on (VLLM_ADAPTIVE_FAULT_INJECT, inherited
by the engine's processes), so every sampler fails at its first step. It is this module's own
server: the session server (conftest.adaptive_server) must sample normally.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from vllm_adaptive.faults import FAULT_INJECT_ENV
from vllm_processes import Server, start_server, stop_server

pytestmark = pytest.mark.server

FAILURES = "vllm_adaptive:sampler_failures_total"


@pytest.fixture(scope="module")
def faulty_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("faulty-server")
    server = start_server(tiny_model, ["--plugin", "adaptive"], folder / "server.log",
                          env={FAULT_INJECT_ENV: "sampler:apply"})
    yield server
    stop_server(server)


def failures(server: Server) -> dict[tuple[str, str], float]:
    """`vllm_adaptive:sampler_failures_total` by (sampler, stage), as a scraper reads it."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    pattern = rf'^{re.escape(FAILURES)}{{sampler="([^"]+)",stage="([^"]+)"}} (\S+)$'
    return {(m.group(1), m.group(2)): float(m.group(3)) for m in re.finditer(pattern, text, re.M)}


def completion(server: Server, **extra: object) -> requests.Response:
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9,
            "seed": 17, "ignore_eos": True, "logprobs": 0, **extra}
    return requests.post(f"{server.url}/v1/completions", json=body, timeout=120)


def test_failing_sampler_serves_the_request_plainly_and_counts_on_metrics(faulty_server: Server) -> None:
    deadline = time.monotonic() + 30
    while not failures(faulty_server) and time.monotonic() < deadline:  # the worker's first snapshot
        time.sleep(0.5)
    before = failures(faulty_server)
    assert before[("typical", "apply")] == 0 and before[("mirostat_v2", "update_state")] == 0

    plain = completion(faulty_server)
    with_sampler = completion(faulty_server, vllm_xargs={"adaptive_sampler": "typical", "typical_p": 0.2})
    assert plain.status_code == 200 and with_sampler.status_code == 200, with_sampler.text
    # served as without the sampler: the same tokens and the untruncated distribution's logprobs
    assert with_sampler.json()["choices"][0]["logprobs"] == plain.json()["choices"][0]["logprobs"]

    deadline = time.monotonic() + 10  # the worker writes its snapshot at most every 0.5 s
    while failures(faulty_server)[("typical", "apply")] == before[("typical", "apply")]:
        assert time.monotonic() < deadline, failures(faulty_server)
        time.sleep(0.2)
    after = failures(faulty_server)
    changed = {kind: after[kind] - before.get(kind, 0.0) for kind in after if after[kind] != before.get(kind, 0.0)}
    assert changed == {("typical", "apply"): 1.0}
