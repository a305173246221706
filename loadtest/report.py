"""What a run leaves in its results folder: summary tables (Markdown, JSON), plots, A/B ratios.

Tables are Markdown so the same text reads well in a terminal, a CI log and the docs. Plots are
drawn from the per-request records (not locust's rounded percentiles), with matplotlib's Agg
backend (no display needed).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from .measures import Distribution, RequestRecord, Summary, percentile
from .slo import describe

LATENCY_ROWS = (("TTFT", "ttft"), ("ITL", "itl"), ("TPOT", "tpot"), ("E2E latency", "e2e"))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def latency_table(summary: Summary) -> list[str]:
    lines = ["| latency (ms) | p50 | p90 | p99 | mean | samples |", "|---|--:|--:|--:|--:|--:|"]
    for label, name in LATENCY_ROWS:
        d: Distribution = getattr(summary, name)
        lines.append(
            f"| {label} | {_ms(d.p50)} | {_ms(d.p90)} | {_ms(d.p99)} | {_ms(d.mean)} | {d.count} |"
        )
    return lines


def figures_table(summary: Summary) -> list[str]:
    completed = summary.completed or 1
    rows = [
        ("requests completed", str(summary.completed)),
        ("failed requests", str(summary.failed)),
        ("measured span (s)", _number(summary.duration_s)),
        ("mean requests in flight", _number(summary.mean_in_flight)),
        ("request throughput (req/s)", _number(summary.request_throughput)),
        ("output token throughput (tok/s)", _number(summary.output_token_throughput)),
        ("total token throughput (tok/s)", _number(summary.total_token_throughput)),
        ("mean prompt tokens per request", _number(summary.prompt_tokens / completed, 1)),
        ("mean output tokens per request", _number(summary.output_tokens / completed, 1)),
    ]
    if summary.slos_ms:
        rows.append((
            f"goodput (req/s; {describe(summary.slos_ms)})",
            f"{_number(summary.goodput)} ({summary.good_requests} of {summary.completed} good)",
        ))
    else:
        rows.append(("goodput (req/s)", "- (no --slo given)"))
    return ["| figure | value |", "|---|--:|", *(f"| {k} | {v} |" for k, v in rows)]


def counters_table(counters: Mapping[str, float] | None) -> list[str]:
    if counters is None:
        return ["Server counters: /metrics could not be read."]
    if not counters:
        return ["Server counters: no vllm: or vllm_adaptive: counter changed."]
    lines = ["| server counter (after - before) | change |", "|---|--:|"]
    lines += [f"| `{key}` | {value:g} |" for key, value in counters.items()]
    return lines


def server_latency_table(means_ms: Mapping[str, float] | None) -> list[str]:
    if not means_ms:
        return []
    lines = ["| server-side latency histogram (engine timing) | mean over the run (ms) |",
             "|---|--:|"]
    lines += [f"| `{name}` | {value:.2f} |" for name, value in means_ms.items()]
    return lines


def errors_table(errors: Mapping[str, int]) -> list[str]:
    if not errors:
        return []
    lines = ["| failure | count |", "|---|--:|"]
    lines += [f"| {message.replace('|', '/')[:200]} | {n} |" for message, n in errors.items()]
    return lines


def render_summary(summary: Summary, heading: Sequence[str] = ()) -> str:
    blocks = [list(heading), latency_table(summary), figures_table(summary),
              errors_table(summary.errors), counters_table(summary.server_counters),
              server_latency_table(summary.server_latency_means_ms)]
    return "\n\n".join("\n".join(block) for block in blocks if block) + "\n"


# A/B: the summary figures compared, as (label, attribute path in Summary).
AB_FIGURES: tuple[tuple[str, str], ...] = (
    ("TTFT p50 (ms)", "ttft.p50"), ("TTFT p90 (ms)", "ttft.p90"), ("TTFT p99 (ms)", "ttft.p99"),
    ("ITL p50 (ms)", "itl.p50"), ("ITL p90 (ms)", "itl.p90"), ("ITL p99 (ms)", "itl.p99"),
    ("TPOT p50 (ms)", "tpot.p50"), ("TPOT p90 (ms)", "tpot.p90"), ("TPOT p99 (ms)", "tpot.p99"),
    ("E2E p50 (ms)", "e2e.p50"), ("E2E p90 (ms)", "e2e.p90"), ("E2E p99 (ms)", "e2e.p99"),
    ("requests completed", "completed"), ("failed requests", "failed"),
    ("mean requests in flight", "mean_in_flight"),
    ("request throughput (req/s)", "request_throughput"),
    ("output token throughput (tok/s)", "output_token_throughput"),
    ("total token throughput (tok/s)", "total_token_throughput"),
    ("goodput (req/s)", "goodput"),
)

COUNT_FIGURES = frozenset({"completed", "failed"})


def figure(summary: Summary, path: str) -> float | None:
    value: object = summary
    for part in path.split("."):
        value = getattr(value, part)
    return None if value is None else float(value)  # type: ignore[arg-type]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def render_ab(a: Summary, b: Summary, label_a: str, label_b: str) -> str:
    lines = [f"A: {label_a}", f"B: {label_b}", "",
             "| figure | A | B | B/A |", "|---|--:|--:|--:|"]
    for label, path in AB_FIGURES:
        fa, fb = figure(a, path), figure(b, path)
        if fa is None and fb is None:
            continue
        digits = 0 if path in COUNT_FIGURES else 2
        lines.append(
            f"| {label} | {_number(fa, digits)} | {_number(fb, digits)} "
            f"| {_number(ratio(fa, fb), 3)} |"
        )
    return "\n".join(lines) + "\n"


def ab_ratios(a: Summary, b: Summary) -> dict[str, dict[str, float | None]]:
    return {
        path: {"a": figure(a, path), "b": figure(b, path),
               "ratio": ratio(figure(a, path), figure(b, path))}
        for _, path in AB_FIGURES
    }


def read_records(path: Path) -> list[RequestRecord]:
    if not path.exists():
        return []
    return [RequestRecord.from_json(line) for line in path.read_text().splitlines() if line]


def write_summary(out: Path, summary: Summary, text: str, run: Mapping[str, object]) -> None:
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(
        json.dumps({"run": dict(run), "summary": summary.to_dict()}, indent=2) + "\n"
    )


def _bucket_width(span: float) -> float:
    return max(1.0, span / 40.0)


def plot_latency_over_time(records: Sequence[RequestRecord], path: Path) -> bool:
    """TTFT, TPOT and E2E p50/p90/p99 per time bucket (by request completion). False: no data."""
    done = [r for r in records if r.ok]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r.start for r in records)
    width = _bucket_width(max(r.end for r in records) - t0)
    measures = (("TTFT", lambda r: r.ttft), ("TPOT", lambda r: r.tpot), ("E2E", lambda r: r.e2e))
    fig, axes = plt.subplots(len(measures), 1, figsize=(9, 8), sharex=True)
    for ax, (label, get) in zip(axes, measures):
        buckets: dict[int, list[float]] = {}
        for r in done:
            value = get(r)
            if value is not None:
                buckets.setdefault(int((r.end - t0) // width), []).append(value * 1000.0)
        xs = sorted(buckets)
        for q in (50, 90, 99):
            ys = [percentile(sorted(buckets[x]), q) for x in xs]
            ax.plot([(x + 0.5) * width for x in xs], ys, marker=".", label=f"p{q}")
        ax.set_ylabel(f"{label} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right")
    axes[-1].set_xlabel(f"seconds since the first request (buckets of {width:g} s)")
    fig.suptitle("Latency percentiles over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_throughput_over_time(records: Sequence[RequestRecord], path: Path) -> bool:
    """Completed requests/s (by completion) and output tokens/s (by chunk arrival) per bucket."""
    done = [r for r in records if r.ok]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(r.start for r in records)
    width = _bucket_width(max(r.end for r in records) - t0)
    last = int((max(r.end for r in records) - t0) // width)
    requests_per = [0.0] * (last + 1)
    tokens_per = [0.0] * (last + 1)
    failed_per = [0.0] * (last + 1)
    for r in records:
        if not r.ok:
            failed_per[int((r.end - t0) // width)] += 1 / width
    for r in done:
        requests_per[int((r.end - t0) // width)] += 1 / width
        if r.ttft is None or not r.output_chunks:
            continue
        per_chunk = r.output_tokens / r.output_chunks
        at = r.start + r.ttft
        arrivals = [at]
        for gap in r.itl:
            at += gap
            arrivals.append(at)
        for arrival in arrivals:
            tokens_per[min(int((arrival - t0) // width), last)] += per_chunk / width
    xs = [(i + 0.5) * width for i in range(last + 1)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(xs, requests_per, marker=".", label="completed")
    if any(failed_per):
        top.plot(xs, failed_per, marker="x", color="red", label="failed")
    top.set_ylabel("requests / s")
    top.legend(loc="upper right")
    bottom.plot(xs, tokens_per, marker=".", color="tab:green")
    bottom.set_ylabel("output tokens / s")
    bottom.set_xlabel(f"seconds since the first request (buckets of {width:g} s)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    fig.suptitle("Throughput over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
