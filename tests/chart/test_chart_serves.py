"""The chart's rendered command lines serve on this machine, and every metric its dashboards and
autoscalers name is on a real server's /metrics.

Two `vllm serve` processes are started together (their engine starts overlap), each from the
container command and arguments of a rendered Deployment:
- the CPU example (examples/cpu.yaml) as rendered, with only what differs off-cluster
  substituted: the model (the project's tiny model for the hub id), the config path (a copy of
  the rendered ConfigMap's adaptive.yaml), and host and port (loopback, a free port). It gets
  /health 200 and completions, and its /metrics must have every metric of the main dashboard
  and of the HPA and KEDA objects;
- the adaptive-speculation example (examples/speculative.yaml, a GPU example), with the same
  substitutions plus the draft model (the tiny model's first layer, tests/draft_models.py), a
  context length the tiny model has and a small CPU KV cache. Its /metrics must have every
  metric of the speculation dashboard (vllm_adaptive:spec_* exist only with adaptive drafting).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from chart_tools import (
    CHART,
    command_line,
    config_map_file,
    flag_value,
    one,
    render,
    replace_flag,
    speculative_config,
)
from draft_models import ensure_truncated_draft
from reference import KV_CACHE_BYTES, MAX_MODEL_LEN
from vllm_processes import SERVER_START_TIMEOUT_S, Server, free_port, stop_server, vllm_command

pytestmark = pytest.mark.server

CPU_EXAMPLE = CHART / "examples" / "cpu.yaml"
SPECULATIVE_EXAMPLE = CHART / "examples" / "speculative.yaml"
MAIN_DASHBOARD = CHART / "dashboards" / "vllm-adaptive.json"
SPECULATIVE_DASHBOARD = CHART / "dashboards" / "vllm-adaptive-speculative.json"
CONFIG_PATH = "/etc/vllm-adaptive/adaptive.yaml"
METRIC_NAME = re.compile(r"\b(vllm(?:_adaptive)?:[A-Za-z_][A-Za-z0-9_:]*)")


def local_command(objects: list[dict[str, Any]], model: Path, folder: Path) -> tuple[list[str], int]:
    """The rendered container command with the off-cluster substitutions; and its port."""
    argv = command_line(objects)
    assert argv[:2] == ["vllm", "serve"]
    config = folder / "adaptive.yaml"
    config.write_text(config_map_file(objects, flag_value(argv, "--adaptive-config") or ""))
    port = free_port()
    argv = [*vllm_command(), "serve", str(model), *argv[3:]]
    argv = replace_flag(argv, "--adaptive-config", str(config))
    argv = replace_flag(argv, "--host", "127.0.0.1")
    argv = replace_flag(argv, "--port", str(port))
    return argv, port


def launch(argv: list[str], port: int, log: Path, name: str) -> Server:
    handle = log.open("w")
    process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    return Server(url=f"http://127.0.0.1:{port}", model=name, log=log, process=process)


def wait_healthy(servers: list[Server]) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    waiting = list(servers)
    while waiting and time.monotonic() < deadline:
        for server in list(waiting):
            if server.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {server.process.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(f"{server.url}/health", timeout=2).status_code == 200:
                    waiting.remove(server)
            except requests.RequestException:
                pass
        time.sleep(2)
    if waiting:
        raise RuntimeError(f"not healthy in {SERVER_START_TIMEOUT_S}s:\n{waiting[0].log_tail()}")


@pytest.fixture(scope="module")
def example_servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    cpu_folder = tmp_path_factory.mktemp("chart-cpu-example")
    cpu_objects = render(CPU_EXAMPLE)
    cpu_argv, cpu_port = local_command(cpu_objects, tiny_model, cpu_folder)

    spec_folder = tmp_path_factory.mktemp("chart-speculative-example")
    spec_objects = render(SPECULATIVE_EXAMPLE)
    spec_argv, spec_port = local_command(spec_objects, tiny_model, spec_folder)
    speculative = speculative_config(spec_argv)
    assert speculative is not None
    speculative["model"] = str(ensure_truncated_draft(tiny_model, num_layers=1))
    spec_argv = replace_flag(spec_argv, "--speculative-config", json.dumps(speculative))
    spec_argv = replace_flag(spec_argv, "--max-model-len", str(MAX_MODEL_LEN))
    assert flag_value(spec_argv, "--kv-cache-memory-bytes") is None
    spec_argv += ["--kv-cache-memory-bytes", str(KV_CACHE_BYTES)]

    servers = {
        "cpu": launch(cpu_argv, cpu_port, cpu_folder / "server.log", flag_value(cpu_argv, "--served-model-name") or ""),
        "speculative": launch(spec_argv, spec_port, spec_folder / "server.log",
                              flag_value(spec_argv, "--served-model-name") or ""),
    }
    try:
        wait_healthy(list(servers.values()))
        yield servers
    finally:
        for server in servers.values():
            stop_server(server)


def complete(server: Server, **extra: Any) -> requests.Response:
    return requests.post(f"{server.url}/v1/completions", timeout=300, json={
        "model": server.model, "prompt": "Kubernetes schedules", "max_tokens": 8, "temperature": 0.0,
        "ignore_eos": True, **extra})


def exported_names(server: Server) -> set[str]:
    """Every sample name /metrics can carry, from its families' declared types: a counter
    `x` is sampled as `x_total`, a histogram `x` as `x_bucket`, `x_sum`, `x_count`."""
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def dashboard_metrics(path: Path) -> set[str]:
    dashboard = json.loads(path.read_text())
    texts = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    texts += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return {name for text in texts for name in METRIC_NAME.findall(text)}


def autoscaler_metrics() -> set[str]:
    hpa = one(render(CHART / "examples" / "gpu-single.yaml"), "HorizontalPodAutoscaler")
    scaled = one(render(CHART / "examples" / "gpu-tensor-parallel.yaml"), "ScaledObject")
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    names |= {n for trigger in scaled["spec"]["triggers"] for n in METRIC_NAME.findall(trigger["metadata"]["query"])}
    return names


def test_cpu_example_serves_health_and_completions(example_servers: dict[str, Server]) -> None:
    server = example_servers["cpu"]
    assert server.model == "qwen2.5-0.5b"  # the example's served name, not the substituted path
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
    plain = complete(server)
    assert plain.status_code == 200, plain.text
    assert plain.json()["usage"]["completion_tokens"] == 8
    adaptive = complete(server, temperature=1.0, vllm_xargs={"adaptive_sampler": "mirostat_v2"})
    assert adaptive.status_code == 200, adaptive.text
    assert adaptive.json()["usage"]["completion_tokens"] == 8
    refused = complete(server, vllm_xargs={"adaptive_sampler": "mirostat_v2", "mirostat_tau": -1})
    assert refused.status_code == 400, refused.text
    assert "mirostat_tau" in refused.text


def test_main_dashboard_and_autoscaler_metrics_are_on_the_cpu_example_server(example_servers: dict[str, Server]) -> None:
    server = example_servers["cpu"]
    assert complete(server).status_code == 200  # the plugin's counters exist once a request came
    named = dashboard_metrics(MAIN_DASHBOARD) | autoscaler_metrics()
    assert {n.split(":")[0] for n in named} == {"vllm", "vllm_adaptive"}
    assert "vllm:num_requests_waiting" in named
    missing = sorted(named - exported_names(server))
    assert not missing, f"named by the dashboard or autoscalers but not on /metrics: {missing}"


def test_speculation_dashboard_metrics_are_on_the_speculative_example_server(example_servers: dict[str, Server]) -> None:
    server = example_servers["speculative"]
    for _ in range(3):
        reply = complete(server, max_tokens=24)
        assert reply.status_code == 200, reply.text
    named = dashboard_metrics(SPECULATIVE_DASHBOARD)
    assert any(n.startswith("vllm_adaptive:spec_") for n in named)
    # Workers publish their figures at most every 0.5 s (vllm_adaptive/worker_metrics.py).
    deadline = time.monotonic() + 30
    missing = sorted(named - exported_names(server))
    while missing and time.monotonic() < deadline:
        time.sleep(1)
        missing = sorted(named - exported_names(server))
    assert not missing, f"named by the speculation dashboard but not on /metrics: {missing}"
