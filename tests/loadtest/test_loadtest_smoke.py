"""The load test against the real CPU server: a bounded smoke run with zero failures, and A/B.

`vllm-adaptive-loadtest` runs in a subprocess (locust's gevent monkey-patching must stay out of
pytest) against the session's `adaptive_server` (tests/conftest.py: `vllm serve <tiny model>
--plugin adaptive` on loopback). Load: 4 users for 20 s, then 2 x 12 requests for A/B.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_adaptive.loadtest import cli
from vllm_adaptive.loadtest.measures import Summary
from vllm_adaptive.loadtest.report import read_records

pytestmark = pytest.mark.server

USERS = 4
DURATION_S = 20
MAX_TOKENS = 16
AB_REQUESTS = 12


@dataclass(frozen=True)
class Run:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def summary(self, sub: str = "") -> Summary:
        data = json.loads((self.out / sub / "summary.json").read_text())
        return Summary.from_dict(data["summary"])


def run_loadtest(args: list[str], out: Path) -> Run:
    script = Path(sys.executable).parent / "vllm-adaptive-loadtest"
    proc = subprocess.run([str(script), *args, "--out", str(out)], check=False, capture_output=True,
                          text=True, timeout=300)
    return Run(out, proc.returncode, proc.stdout, proc.stderr)


def counter(summary: Summary, prefix: str) -> float:
    assert summary.server_counters is not None, "/metrics was not read"
    return sum(v for k, v in summary.server_counters.items() if k.startswith(prefix))


@pytest.fixture(scope="module")
def smoke(adaptive_server, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("loadtest") / "smoke"
    return run_loadtest(
        ["--url", adaptive_server.url, "--scenario", "mirostat_v2", "--users", str(USERS),
         "--duration", f"{DURATION_S}s", "--max-tokens", str(MAX_TOKENS), "--fixed-output",
         "--slo", "ttft:2000,tpot:500"],
        out,
    )


def test_smoke_run_has_zero_failures_and_prints_its_summary(
    smoke: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    with capsys.disabled():
        print("\n" + smoke.stdout)
    assert smoke.returncode == 0, f"{smoke.stdout[-3000:]}\n{smoke.stderr[-3000:]}"
    summary = smoke.summary()
    assert summary.failed == 0
    assert summary.completed >= USERS
    assert "| latency (ms) | p50 | p90 | p99 | mean | samples |" in smoke.stdout
    assert "| failed requests | 0 |" in smoke.stdout


def test_every_request_wrote_exactly_the_tokens_asked_for(smoke: Run) -> None:
    records = read_records(smoke.out / "requests.jsonl")
    summary = smoke.summary()
    assert len(records) == summary.completed
    assert {(r.output_tokens, r.tokens_from) for r in records} == {(MAX_TOKENS, "usage")}
    assert all(r.prompt_tokens and r.prompt_tokens > 0 for r in records)
    assert summary.output_tokens == MAX_TOKENS * summary.completed


def test_latencies_are_measured_and_consistent(smoke: Run) -> None:
    summary = smoke.summary()
    records = read_records(smoke.out / "requests.jsonl")
    assert summary.ttft.p50 is not None and summary.ttft.p50 > 0
    assert summary.itl.p50 is not None and summary.itl.p50 > 0
    assert summary.tpot.p50 is not None and summary.tpot.p50 > 0
    assert summary.e2e.p50 is not None and summary.e2e.p50 > summary.ttft.p50
    assert summary.ttft.count == summary.tpot.count == summary.e2e.count == summary.completed
    # every chunk after the first is one gap; with return_token_ids each chunk holds >= 1 token
    assert summary.itl.count == sum(r.output_chunks - 1 for r in records)
    assert all(1 <= r.output_chunks <= r.output_tokens for r in records)
    assert all(0 < r.ttft < r.e2e for r in records if r.ttft is not None)
    assert summary.request_throughput == pytest.approx(summary.completed / summary.duration_s)
    assert 0 < summary.mean_in_flight <= USERS + 1e-9  # closed loop: never more than the users
    assert 0 < summary.duration_s <= DURATION_S + 30  # run time + stop timeout
    assert summary.good_requests is not None and summary.goodput is not None


def test_server_counters_saw_exactly_the_runs_requests(smoke: Run) -> None:
    summary = smoke.summary()
    assert counter(summary, 'vllm_adaptive:requests_total{sampler="mirostat_v2"}') == (
        summary.requests
    )
    assert counter(summary, "vllm:generation_tokens_total") == MAX_TOKENS * summary.completed
    assert counter(summary, "vllm:request_success_total") == summary.completed


def test_results_folder_holds_locusts_reports_and_the_plots(smoke: Run) -> None:
    summary = smoke.summary()
    stats = json.loads((smoke.out / "locust_stats.json").read_text())
    by_type = {entry["method"]: entry for entry in stats}
    assert set(by_type) == {"POST", "TTFT", "ITL", "TPOT"}
    assert by_type["POST"]["num_requests"] == summary.completed
    assert by_type["POST"]["num_failures"] == 0
    assert by_type["ITL"]["num_requests"] == summary.itl.count
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv",
                 "report.html", "summary.md"):
        assert (smoke.out / name).stat().st_size > 0, name
    for name in ("latency_over_time.png", "throughput_over_time.png"):
        assert (smoke.out / name).read_bytes()[:4] == b"\x89PNG", name


def test_ab_run_compares_two_request_configs_on_one_server(
    adaptive_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = run_loadtest(
        ["--url", adaptive_server.url, "--scenario", "plain", "--b-scenario", "mirostat_v2",
         "--users", "2", "--requests", str(AB_REQUESTS), "--max-tokens", "8", "--fixed-output",
         "--api", "chat"],
        tmp_path / "ab",
    )
    with capsys.disabled():
        print("\n" + run.stdout[run.stdout.find("A: "):])
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    a, b = run.summary("a"), run.summary("b")
    assert (a.completed, a.failed, b.completed, b.failed) == (AB_REQUESTS, 0, AB_REQUESTS, 0)
    assert counter(a, 'vllm_adaptive:requests_total{sampler="none"}') == AB_REQUESTS
    assert counter(a, 'vllm_adaptive:requests_total{sampler="mirostat_v2"}') == 0
    assert counter(b, 'vllm_adaptive:requests_total{sampler="mirostat_v2"}') == AB_REQUESTS
    figures = json.loads((run.out / "ab.json").read_text())["figures"]
    assert figures["completed"] == {"a": AB_REQUESTS, "b": AB_REQUESTS, "ratio": 1.0}
    ttft = figures["ttft.p50"]
    assert ttft["ratio"] == pytest.approx(ttft["b"] / ttft["a"])
    assert "| TTFT p50 (ms) |" in (run.out / "ab.md").read_text()


def test_model_the_server_does_not_serve_is_refused(
    adaptive_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--url", adaptive_server.url, "--model", "no-such-model",
                     "--out", str(tmp_path / "r")])
    assert code == 2
    assert (
        f"{adaptive_server.url} does not serve model 'no-such-model'; "
        f"it serves: {adaptive_server.model}"
    ) in capsys.readouterr().err
