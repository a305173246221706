"""`vllm serve MODEL --plugin adaptive` over HTTP on loopback (one server for the module)."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import requests

from vllm_adaptive.sampling.params import SAMPLERS
from vllm_processes import SERVER_TAU, Server, vllm_command
from reference import GREEDY_MAX_TOKENS, GREEDY_PROMPTS

pytestmark = pytest.mark.server


def complete(server: Server, **body: object) -> requests.Response:
    return requests.post(f"{server.url}/v1/completions", json={"model": server.model, **body}, timeout=120)


def counter(server: Server, name: str, label: str, value: str) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=30).text
    match = re.search(rf'^{re.escape(name)}{{{label}="{re.escape(value)}"}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_mirostat_request_is_served(adaptive_server: Server) -> None:
    response = complete(adaptive_server, prompt="Hello", max_tokens=16, temperature=1.0, ignore_eos=True,
                        vllm_xargs={"adaptive_sampler": "mirostat_v2", "mirostat_tau": 3.0, "mirostat_eta": 0.1})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_is_selectable_over_http(adaptive_server: Server, sampler: str) -> None:
    name = "vllm_adaptive:requests_total"
    before = counter(adaptive_server, name, "sampler", sampler)
    response = complete(adaptive_server, prompt="Hello", max_tokens=8, temperature=0.9, ignore_eos=True,
                        vllm_xargs={"adaptive_sampler": sampler})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8
    assert counter(adaptive_server, name, "sampler", sampler) == before + 1


def test_workers_use_the_adaptive_config_file(adaptive_server: Server) -> None:
    """The server's --adaptive-config sets mirostat_tau=2.0 (built-in default: 5.0); a request
    that names Mirostat without a tau is sampled by the worker with the file's value."""
    response = complete(adaptive_server, prompt="Once upon a time", max_tokens=220, temperature=1.0,
                        ignore_eos=True, logprobs=0, seed=3, vllm_xargs={"adaptive_sampler": "mirostat_v2"})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]["token_logprobs"]  # final distribution
    mean_surprise = -sum(logprobs) / len(logprobs) / math.log(2)
    assert len(logprobs) == 220
    assert abs(mean_surprise - SERVER_TAU) < 0.5, mean_surprise


def test_chat_request_with_sampler_is_served(adaptive_server: Server) -> None:
    response = requests.post(f"{adaptive_server.url}/v1/chat/completions", timeout=120, json={
        "model": adaptive_server.model, "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8, "vllm_xargs": {"adaptive_sampler": "mirostat_v2"}})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("xargs", "parameter", "fragments"),
    [
        ({"adaptive_sampler": "mirostat_v2", "mirostat_tau": -1}, "mirostat_tau",
         ["mirostat_tau", "(0, 40]", "got -1"]),
        ({"adaptive_sampler": "nope"}, "adaptive_sampler",
         ["adaptive_sampler", "'mirostat_v1', 'mirostat_v2', 'top_n_sigma', 'typical'", "got 'nope'"]),
        ({"adaptive_sampler": "mirostat_v1", "mirostat_m": 1}, "mirostat_m", ["mirostat_m", "[2, 1000]", "got 1"]),
        ({"adaptive_sampler": "dynatemp", "dynatemp_exponent": 0}, "dynatemp_exponent",
         ["dynatemp_exponent", "(0, 10]", "got 0"]),
        ({"adaptive_sampler": "edt", "edt_base": 2}, "edt_base", ["edt_base", "(0, 1)", "got 2"]),
        ({"adaptive_sampler": "typical", "typical_p": 1.5}, "typical_p", ["typical_p", "(0, 1]", "got 1.5"]),
        ({"adaptive_sampler": "epsilon", "epsilon": "x"}, "epsilon", ["epsilon", "(0, 1)", "got 'x'"]),
        ({"adaptive_sampler": "eta", "eta_cutoff": 1}, "eta_cutoff", ["eta_cutoff", "(0, 1)", "got 1"]),
        ({"adaptive_sampler": "top_n_sigma", "top_n_sigma": -2}, "top_n_sigma",
         ["top_n_sigma", "(0, 100]", "got -2"]),
        ({"adaptive_sampler": "typical", "mirostat_tau": 3}, "mirostat_tau",
         ["mirostat_tau does not apply to adaptive_sampler='typical'", "['typical_p']"]),
    ],
)
def test_bad_arguments_get_400_naming_parameter_range_and_value(
    adaptive_server: Server, xargs: dict, parameter: str, fragments: list[str]
) -> None:
    before = counter(adaptive_server, "vllm_adaptive:rejected_requests_total", "parameter", parameter)
    response = complete(adaptive_server, prompt="Hello", max_tokens=4, vllm_xargs=xargs)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == parameter
    for fragment in fragments:
        assert fragment in error["message"]
    after = counter(adaptive_server, "vllm_adaptive:rejected_requests_total", "parameter", parameter)
    assert after == before + 1
    # and the server keeps serving
    assert complete(adaptive_server, prompt="Hello", max_tokens=4).status_code == 200


def test_greedy_token_ids_equal_plain_vllm(adaptive_server: Server, plain_greedy_token_ids: list[list[int]]) -> None:
    served = []
    for prompt in GREEDY_PROMPTS:
        response = complete(adaptive_server, prompt=prompt, max_tokens=GREEDY_MAX_TOKENS, temperature=0.0,
                            ignore_eos=True, return_token_ids=True)
        assert response.status_code == 200, response.text
        served.append(response.json()["choices"][0]["token_ids"])
    assert served == plain_greedy_token_ids


def test_metrics_count_requests_by_sampler(adaptive_server: Server) -> None:
    name = "vllm_adaptive:requests_total"
    before = {s: counter(adaptive_server, name, "sampler", s) for s in ("mirostat_v2", "none")}
    for _ in range(3):
        assert complete(adaptive_server, prompt="a", max_tokens=2,
                        vllm_xargs={"adaptive_sampler": "mirostat_v2"}).status_code == 200
    for _ in range(2):
        assert complete(adaptive_server, prompt="b", max_tokens=2).status_code == 200
    assert counter(adaptive_server, name, "sampler", "mirostat_v2") == before["mirostat_v2"] + 3
    assert counter(adaptive_server, name, "sampler", "none") == before["none"] + 2


def run_serve(tiny_model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*vllm_command(), "serve", str(tiny_model), *args],
                          capture_output=True, text=True, timeout=300)


def test_bad_config_stops_startup_naming_the_key(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("sampling:\n  mirostat_tua: 3.0\n")
    proc = run_serve(tiny_model, "--plugin", "adaptive", "--adaptive-config", str(config))
    assert proc.returncode == 2
    assert "unknown key 'sampling.mirostat_tua'" in proc.stderr
    assert "mirostat_tau" in proc.stderr  # the allowed keys are listed


def test_unknown_plugin_name_stops_startup(tiny_model: Path) -> None:
    proc = run_serve(tiny_model, "--plugin", "nope")
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr


def test_config_without_plugin_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    config = tmp_path / "ok.yaml"
    config.write_text("sampling:\n  mirostat_tau: 3.0\n")
    proc = run_serve(tiny_model, "--adaptive-config", str(config), "--kv-cache-memory-bytes", str(1 << 30))
    assert proc.returncode != 0
    assert "--adaptive-config needs --plugin adaptive" in proc.stdout + proc.stderr
