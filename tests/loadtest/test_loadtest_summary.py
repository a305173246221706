"""Run summaries: percentiles, throughput, goodput against SLOs, server counters, tables, plots."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vllm_adaptive.loadtest import report
from vllm_adaptive.loadtest.measures import RequestRecord, Summary, percentile, summarize
from vllm_adaptive.loadtest.server_metrics import (
    counter_deltas,
    latency_means_ms,
    parse_counters,
    parse_metrics,
)
from vllm_adaptive.loadtest.slo import SLOError, parse_slos


def record(start: float, ttft: float, itl: tuple[float, ...], tokens: int, prompt: int = 10,
           ok: bool = True, error: str | None = None) -> RequestRecord:
    return RequestRecord(
        start=start, e2e=ttft + sum(itl), ok=ok, error=error, ttft=ttft, itl=itl,
        output_tokens=tokens, tokens_from="usage", prompt_tokens=prompt,
        output_chunks=len(itl) + 1,
    )


# Four completed requests and one failure, over exactly 10 s (start 100.0 -> last end 110.0).
RECORDS = [
    record(100.0, 0.10, (0.02, 0.02, 0.02), 4),  # e2e 0.16, tpot 0.02
    record(101.0, 0.20, (0.05, 0.05), 3),  # e2e 0.30, tpot 0.05
    record(102.0, 0.40, (), 1),  # one token: no TPOT, counts as 0 for goodput
    record(109.0, 0.30, (0.35, 0.35), 3),  # e2e 1.00, tpot 0.35
    RequestRecord(start=104.0, e2e=0.5, ok=False, error="HTTP 500: boom"),
]


def test_percentile_matches_numpy_linear_interpolation() -> None:
    rng = random.Random(1)
    for n in (1, 2, 3, 10, 101):
        values = sorted(rng.uniform(0, 100) for _ in range(n))
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_figures() -> None:
    summary = summarize(RECORDS, parse_slos("ttft:350,tpot:60"))
    assert (summary.requests, summary.completed, summary.failed) == (5, 4, 1)
    assert summary.duration_s == pytest.approx(10.0)
    assert summary.ttft.count == 4
    assert summary.ttft.p50 == pytest.approx(250.0)  # 100, 200, 300, 400 ms
    assert summary.ttft.p90 == pytest.approx(370.0)
    assert summary.ttft.mean == pytest.approx(250.0)
    assert summary.itl.count == 7
    assert summary.itl.p50 == pytest.approx(50.0)  # 20,20,20,50,50,350,350
    assert summary.tpot.count == 3
    assert summary.tpot.p50 == pytest.approx(50.0)
    assert summary.e2e.p99 == pytest.approx(np.percentile([160, 300, 400, 1000], 99))
    assert summary.request_throughput == pytest.approx(0.4)
    assert summary.mean_in_flight == pytest.approx((0.16 + 0.30 + 0.40 + 1.00 + 0.5) / 10)
    assert summary.output_tokens == 11
    assert summary.output_token_throughput == pytest.approx(1.1)
    assert summary.total_token_throughput == pytest.approx(5.1)  # + 40 prompt tokens
    # good: #1 (100 ms, 20 ms) and #2 (200, 50); #3 fails ttft 400 > 350; #4 fails tpot 350 > 60
    assert summary.good_requests == 2
    assert summary.goodput == pytest.approx(0.2)
    assert summary.errors == {"HTTP 500: boom": 1}


def test_one_token_request_meets_any_tpot_slo_and_failures_never_count() -> None:
    summary = summarize(RECORDS, {"tpot": 0.0})
    assert summary.good_requests == 1  # only the one-token request
    assert summarize(RECORDS, {"e2el": 10_000.0}).good_requests == 4


def test_summary_without_records_or_slos() -> None:
    empty = summarize([])
    assert (empty.requests, empty.duration_s, empty.request_throughput) == (0, 0.0, 0.0)
    assert empty.ttft.p50 is None
    assert summarize(RECORDS).goodput is None


def test_summary_round_trips_through_its_dict() -> None:
    summary = summarize(RECORDS, {"ttft": 300.0}, {"vllm:x_total": 3.0})
    assert Summary.from_dict(summary.to_dict()) == summary


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ttft:500", {"ttft": 500.0}),
        ("ttft:500,tpot:50", {"ttft": 500.0, "tpot": 50.0}),
        ("ttft:500 tpot:50 e2el:2000.5", {"ttft": 500.0, "tpot": 50.0, "e2el": 2000.5}),
        ("TTFT:1", {"ttft": 1.0}),
    ],
)
def test_slo_forms_accepted(text: str, expected: dict[str, float]) -> None:
    assert parse_slos(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ttft:abc", "bad SLO 'ttft:abc': 'abc' is not a number of milliseconds"),
        ("ttft=500", "bad SLO 'ttft=500': missing ':'"),
        ("itl:5", "bad SLO 'itl:5': unknown name 'itl'"),
        ("ttft:-1", "bad SLO 'ttft:-1': the limit must be a finite number >= 0 ms"),
        ("ttft:1,ttft:2", "bad SLO 'ttft:2': ttft given twice"),
        (",", "empty SLO ','"),
    ],
)
def test_malformed_slo_names_the_bad_part_and_the_accepted_form(text: str, message: str) -> None:
    with pytest.raises(SLOError) as err:
        parse_slos(text)
    assert str(err.value).startswith(message)
    if "twice" not in message and "finite" not in message:
        assert "e.g. ttft:500,tpot:50" in str(err.value)


EXPOSITION_BEFORE = """\
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="tiny-llama"} 86.0
vllm:generation_tokens_created{engine="0",model_name="tiny-llama"} 1.79e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-llama"} 0.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny-llama"} 0.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny-llama"} 12.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny-llama"} 12.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny-llama"} 12.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny-llama"} 0.13
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
# HELP vllm_adaptive:requests_total Requests admitted by a server running --plugin adaptive.
# TYPE vllm_adaptive:requests_total counter
vllm_adaptive:requests_total{sampler="none"} 11.0
"""

EXPOSITION_AFTER = (
    EXPOSITION_BEFORE.replace("} 86.0", "} 1686.0")
    .replace('finished_reason="length",model_name="tiny-llama"} 12.0',
             'finished_reason="length",model_name="tiny-llama"} 62.0')
    .replace("process_cpu_seconds_total 12.5", "process_cpu_seconds_total 40.0")
    .replace('le="+Inf",model_name="tiny-llama"} 12.0', 'le="+Inf",model_name="tiny-llama"} 62.0')
    .replace('_count{engine="0",model_name="tiny-llama"} 12.0',
             '_count{engine="0",model_name="tiny-llama"} 62.0')
    .replace('_sum{engine="0",model_name="tiny-llama"} 0.13',
             '_sum{engine="0",model_name="tiny-llama"} 0.63')
    + 'vllm_adaptive:requests_total{sampler="mirostat_v2"} 50.0\n'
)


SUCCESS = (
    'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="tiny-llama"}}'
)


def test_counters_are_the_vllm_and_adaptive_counters_only() -> None:
    assert parse_counters(EXPOSITION_BEFORE) == {
        'vllm:generation_tokens_total{engine="0",model_name="tiny-llama"}': 86.0,
        SUCCESS.format(reason="stop"): 0.0,
        SUCCESS.format(reason="length"): 12.0,
        'vllm_adaptive:requests_total{sampler="none"}': 11.0,
    }


def test_counter_deltas_leave_out_unchanged_and_start_new_ones_at_zero() -> None:
    deltas = counter_deltas(parse_counters(EXPOSITION_BEFORE), parse_counters(EXPOSITION_AFTER))
    assert deltas == {
        'vllm:generation_tokens_total{engine="0",model_name="tiny-llama"}': 1600.0,
        SUCCESS.format(reason="length"): 50.0,
        'vllm_adaptive:requests_total{sampler="mirostat_v2"}': 50.0,
    }


def test_server_latency_means_come_from_the_histograms_sum_and_count() -> None:
    before = parse_metrics(EXPOSITION_BEFORE).latency_histograms
    after = parse_metrics(EXPOSITION_AFTER).latency_histograms
    assert before == {"vllm:time_to_first_token_seconds": (0.13, 12.0)}
    means = latency_means_ms(before, after)
    assert means == {"vllm:time_to_first_token_seconds": pytest.approx(10.0)}  # 0.5 s / 50
    assert latency_means_ms(after, after) == {}


def test_rendered_summary_shows_the_figures() -> None:
    summary = summarize(RECORDS, {"ttft": 350.0, "tpot": 60.0},
                        {'vllm_adaptive:requests_total{sampler="none"}': 5.0},
                        {"vllm:time_to_first_token_seconds": 7.5})
    text = report.render_summary(summary, ["Load test `plain`"])
    assert text.startswith(
        "Load test `plain`\n\n| latency (ms) | p50 | p90 | p99 | mean | samples |"
    )
    assert "| TTFT | 250.00 | 370.00 | 397.00 | 250.00 | 4 |" in text
    assert "| requests completed | 4 |" in text
    assert "| failed requests | 1 |" in text
    assert "| request throughput (req/s) | 0.40 |" in text
    assert "| goodput (req/s; ttft <= 350 ms, tpot <= 60 ms) | 0.20 (2 of 4 good) |" in text
    assert "| HTTP 500: boom | 1 |" in text
    assert '| `vllm_adaptive:requests_total{sampler="none"}` | 5 |' in text
    assert "| `vllm:time_to_first_token_seconds` | 7.50 |" in text
    no_slo = report.render_summary(summarize(RECORDS))
    assert "| goodput (req/s) | - (no --slo given) |" in no_slo
    assert "/metrics could not be read" in no_slo


def test_ab_table_gives_b_over_a() -> None:
    a = summarize(RECORDS)
    faster = [
        RequestRecord(**{**r.__dict__, "ttft": r.ttft / 2}) if r.ttft else r for r in RECORDS
    ]
    b = summarize(faster)
    text = report.render_ab(a, b, "server A", "server B")
    assert "| TTFT p50 (ms) | 250.00 | 125.00 | 0.500 |" in text
    assert "| requests completed | 4 | 4 | 1.000 |" in text
    assert "| failed requests | 1 | 1 | 1.000 |" in text
    assert "goodput" not in text  # no SLO on either side: nothing to compare
    ratios = report.ab_ratios(a, b)
    assert ratios["ttft.p50"] == {"a": 250.0, "b": 125.0, "ratio": 0.5}
    assert report.ratio(0.0, 3.0) is None


def test_plots_are_written_as_png(tmp_path) -> None:
    for plot in (report.plot_latency_over_time, report.plot_throughput_over_time):
        path = tmp_path / f"{plot.__name__}.png"
        assert plot(RECORDS, path)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not plot([RECORDS[-1]], tmp_path / "none.png")  # nothing completed
    assert not (tmp_path / "none.png").exists()
