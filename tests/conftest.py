"""Fixtures shared by the whole suite: the tiny model, a plain-vLLM reference run, one server.

Engines take about a minute to start on 2 cores, so each kind is started once per session.
Helpers that tests import live in vllm_processes.py and reference.py, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_processes import SERVER_CONFIG, Server, start_server, stop_server

TESTS = Path(__file__).parent

# Triton's interpreter must be on from the start of the process that runs kernel tests (vLLM
# imports Triton long before they would run here), so test_kernels_interpreted.py runs
# tests/kernels in a subprocess with TRITON_INTERPRET=1; this process collects them only when
# it was itself started that way.
if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore = ["kernels"]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from benchmarks.models.tiny import ensure_tiny_llama

    return ensure_tiny_llama()


@pytest.fixture(scope="session")
def plain_greedy_token_ids(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """Greedy outputs of plain vLLM (no plugin loaded) for reference.GREEDY_PROMPTS."""
    out = tmp_path_factory.mktemp("plain") / "plain.json"
    env = {**os.environ, "VLLM_PLUGINS": ""}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "plain_vllm_run.py"), str(tiny_model), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"plain vLLM run failed:\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def adaptive_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`vllm serve MODEL --plugin adaptive --adaptive-config FILE` on loopback, for the session."""
    folder = tmp_path_factory.mktemp("server")
    config = folder / "adaptive.yaml"
    config.write_text(SERVER_CONFIG)
    server = start_server(tiny_model, ["--plugin", "adaptive", "--adaptive-config", str(config)], folder / "server.log")
    yield server
    stop_server(server)
