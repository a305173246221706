"""What a run is told: scenarios, prompts, request bodies, and arguments refused before any load."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path

import pytest

from vllm_adaptive.loadtest import cli
from vllm_adaptive.loadtest.prompts import PromptsError, load_prompts, synthetic_prompts
from vllm_adaptive.loadtest.request_body import RequestSettings, build_body
from vllm_adaptive.loadtest.scenarios import SCENARIOS, UnknownScenarioError, get_scenario
from vllm_adaptive.loadtest.sse import Api

from vllm_adaptive.sampling.params import SAMPLER_KEY, SAMPLERS, parse_sampler_request

# --- scenarios ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_adaptive_sampler_has_a_scenario_the_plugin_accepts(sampler: str) -> None:
    xargs = SCENARIOS[sampler].body["vllm_xargs"]
    assert xargs[SAMPLER_KEY] == sampler
    request = parse_sampler_request(xargs)
    assert request is not None and request.name == sampler


def test_unknown_scenario_lists_the_known_ones() -> None:
    with pytest.raises(UnknownScenarioError) as err:
        get_scenario("mirostat")
    assert str(err.value) == f"unknown scenario 'mirostat'; known scenarios: {', '.join(SCENARIOS)}"


# --- request bodies ----------------------------------------------------------------------------


def test_completions_body_with_fixed_output_and_sampler() -> None:
    settings = RequestSettings(Api.COMPLETIONS, "tiny", max_tokens=16, fixed_output=True,
                               token_ids=True)
    body = build_body(settings, SCENARIOS["mirostat_v2"], "Hello")
    assert body == {
        "model": "tiny", "prompt": "Hello", "max_tokens": 16, "stream": True,
        "stream_options": {"include_usage": True}, "ignore_eos": True, "min_tokens": 16,
        "return_token_ids": True,
        "vllm_xargs": {"adaptive_sampler": "mirostat_v2", "mirostat_tau": 3.0,
                       "mirostat_eta": 0.1},
    }
    body["vllm_xargs"]["mirostat_tau"] = 9.0  # each body is its own copy
    assert SCENARIOS["mirostat_v2"].body["vllm_xargs"]["mirostat_tau"] == 3.0


def test_chat_body_sends_messages_and_leaves_length_to_the_model() -> None:
    settings = RequestSettings(Api.CHAT, "tiny", max_tokens=8, fixed_output=False,
                               token_ids=False)
    body = build_body(settings, SCENARIOS["greedy"], "Hi")
    assert body == {
        "model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
        "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.0,
    }


# --- prompts -------------------------------------------------------------------------------------


def test_prompts_file_text_and_jsonl(tmp_path: Path) -> None:
    text = tmp_path / "p.txt"
    text.write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(text) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "line one\nline two"}) + "\n")
    assert load_prompts(jsonl) == ["line one\nline two"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n", "holds no prompt"),
        ("bad.jsonl", '{"text": "x"}\n', 'bad.jsonl:1: expected a JSON object with a "prompt"'),
    ],
)
def test_unusable_prompts_file(tmp_path: Path, name: str, content: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PromptsError, match=message):
        load_prompts(path)


def test_synthetic_prompts_have_the_asked_length_differ_and_repeat_by_seed() -> None:
    first = list(itertools.islice(synthetic_prompts(12, seed=3), 50))
    assert all(len(p.split()) == 12 for p in first)
    assert len(set(first)) == 50
    assert first == list(itertools.islice(synthetic_prompts(12, seed=3), 50))


# --- command line: refused before locust starts -------------------------------------------------


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scenario", "nope"],
         f"unknown scenario 'nope'; known scenarios: {', '.join(SCENARIOS)}"),
        (["--slo", "ttft:abc"], "--slo: bad SLO 'ttft:abc': 'abc' is not a number of milliseconds"),
        (["--duration", "10x"], "bad --duration '10x': expected seconds or a time like 30s"),
        (["--users", "0"], "--users must be at least 1, got 0"),
        (["--url", "localhost:8000"], "bad URL 'localhost:8000': expected http://HOST:PORT"),
        (["--prompts-file", "/nonexistent/prompts.txt"], "cannot read prompts file"),
    ],
)
def test_bad_arguments_fail_fast_with_a_clear_message(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    # the URL is unreachable too: argument errors are reported before the server is tried
    url = [] if "--url" in args else ["--url", closed_port_url()]
    assert cli.main([*url, *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vllm-adaptive-loadtest: error: ")
    assert message in err
    assert not out.exists()


def test_unreachable_url_is_reported_before_locust_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = closed_port_url()
    out = tmp_path / "results"
    assert cli.main(["--url", url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach {url}: nothing answers there" in err
    assert "make serve" in err
    assert not out.exists()


@pytest.mark.parametrize(("text", "seconds"), [("45", 45), ("30s", 30), ("2m", 120),
                                               ("1h30m", 5400), ("1m5s", 65)])
def test_duration_forms(text: str, seconds: int) -> None:
    assert cli.parse_duration(text) == seconds


def test_list_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list-scenarios"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(SCENARIOS)
    assert "mirostat_tau 3" in lines[list(SCENARIOS).index("mirostat_v2")]
