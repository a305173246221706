"""`vllm serve` with KV compaction (issue #18) under a locust load: blocks come back, nothing fails.

One server: the tiny random model, `--plugin adaptive` with `kvcache.enabled`, a KV pool of 16
blocks of 32 tokens (`--num-gpu-blocks-override`) so that concurrent long prompts compete for
it. `vllm-adaptive-loadtest` (in a subprocess, as tests/loadtest does) sends SnapKV requests
compacted to 1/4 of their prompt from 6 users; afterwards the compacting scheduler's free-block
gauge equals the pool (no block leaked), compactions ran in the server's worker process (the
queries came from the patched attention there: nothing degraded to streaming) and no request
failed. The compaction's exactness is tested offline (tests/engine/test_kv_compaction.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from vllm_processes import Server, start_server, stop_server

pytestmark = pytest.mark.server

CONFIG = "kvcache:\n  enabled: true\n  window: 8\n  buffer: 16\n"
POOL_BLOCKS, BLOCK_SIZE = 16, 32
USERS, REQUESTS, MAX_TOKENS = 6, 24, 32


@pytest.fixture(scope="module")
def kv_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("kv-server")
    config = folder / "adaptive.yaml"
    config.write_text(CONFIG)
    server = start_server(tiny_model, ["--plugin", "adaptive", "--adaptive-config", str(config),
                                       "--num-gpu-blocks-override", str(POOL_BLOCKS),
                                       "--block-size", str(BLOCK_SIZE), "--max-model-len", "320"],
                          folder / "server.log")
    yield server
    stop_server(server)


def metrics(server: Server) -> dict[str, float]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm_adaptive:kv_") or line.startswith("vllm:num_preemptions"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_a_locust_load_with_compaction_gives_every_block_back(kv_server: Server, tmp_path: Path) -> None:
    out = tmp_path / "load"
    script = Path(sys.executable).parent / "vllm-adaptive-loadtest"
    proc = subprocess.run(
        [str(script), "--url", kv_server.url, "--scenario", "kv_snapkv", "--users", str(USERS),
         "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS), "--fixed-output",
         "--prompt-words", "60", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["failed"] == 0 and summary["completed"] == REQUESTS
    # The snapshot files (the scheduler's, the worker's) are written by background threads: wait
    # for the last ones.
    deadline = time.monotonic() + 60
    while True:
        figures = metrics(kv_server)
        settled = (figures.get("vllm_adaptive:kv_free_blocks") == POOL_BLOCKS - 1
                   and figures.get("vllm_adaptive:kv_scored_compactions_total")
                   == figures.get("vllm_adaptive:kv_compactions_total"))
        if settled or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert figures["vllm_adaptive:kv_pool_blocks"] == POOL_BLOCKS - 1
    assert figures["vllm_adaptive:kv_free_blocks"] == POOL_BLOCKS - 1
    assert figures["vllm_adaptive:kv_requests_total"] == REQUESTS
    assert figures["vllm_adaptive:kv_compactions_total"] >= REQUESTS
    assert figures["vllm_adaptive:kv_blocks_freed_total"] > 0
    assert figures["vllm_adaptive:kv_scored_compactions_total"] == figures["vllm_adaptive:kv_compactions_total"]
    assert figures["vllm_adaptive:kv_degraded_total"] == 0


def test_kv_keys_are_refused_with_400_naming_the_key(kv_server: Server) -> None:
    body = {"model": kv_server.model, "prompt": "Tom had a red kite.", "max_tokens": 4,
            "vllm_xargs": {"kv_budget": 0.25, "kv_policy": "pyramid"}}
    response = requests.post(f"{kv_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "kv_policy" in response.text and "snapkv" in response.text and "pyramid" in response.text
