"""Per-request latency measures from a timed SSE stream, and their summary over a run.

Definitions (they follow `vllm bench serve`, vllm/benchmarks/serve.py, where noted):
- TTFT: request sent -> first streamed chunk that carries output (text, or token ids when the
  request asked vLLM for `return_token_ids`). Role-only and empty chunks do not count.
- ITL: the gap between consecutive output-carrying chunks, one value per gap. A chunk that
  carries several tokens (speculative decoding, stream intervals) is one gap, as in vLLM bench.
- E2E latency: request sent -> end of the stream (`[DONE]`, or the connection closing).
- Output tokens: the server's `usage.completion_tokens` (`stream_options.include_usage`);
  without usage, the number of streamed token ids; without those, output-carrying chunks.
- TPOT = (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
- Goodput: completed requests per second that meet every SLO given (`vllm bench serve
  --goodput`): TTFT <= ttft, TPOT <= tpot (a one-token request counts as TPOT 0), E2E <= e2el.
- Throughput divides by the measured span: first request sent -> last response finished.
- Mean requests in flight = sum of all requests' E2E / span: the concurrency the server really
  had, below the user count when the client spends time between requests.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .sse import StreamChunk

MS = 1000.0
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class RequestRecord:
    """One request as measured by the client. Times in seconds; `start` is Unix time."""

    start: float
    e2e: float
    ok: bool
    error: str | None = None
    ttft: float | None = None
    itl: tuple[float, ...] = ()
    output_tokens: int = 0
    tokens_from: str = "none"  # "usage", "token_ids", "chunks" or "none"
    prompt_tokens: int | None = None
    output_chunks: int = 0
    finish_reason: str | None = None

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def end(self) -> float:
        return self.start + self.e2e

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> RequestRecord:
        data = json.loads(line)
        data["itl"] = tuple(data.get("itl") or ())
        return cls(**data)


class StreamMeasurer:
    """Fed each decoded chunk with its arrival time (seconds after the request was sent)."""

    def __init__(self, start: float, expected_output_tokens: int | None = None) -> None:
        self.start = start
        self.expected_output_tokens = expected_output_tokens
        self._output_times: list[float] = []
        self._streamed_token_ids = 0
        self._usage_tokens: int | None = None
        self._prompt_tokens: int | None = None
        self._finish_reason: str | None = None
        self._error: str | None = None
        self._done = False

    def observe(self, at: float, chunk: StreamChunk) -> None:
        if chunk.done:
            self._done = True
            return
        if chunk.error is not None and self._error is None:
            self._error = f"error in stream: {chunk.error}"
        if chunk.carries_output:
            self._output_times.append(at)
        self._streamed_token_ids += len(chunk.token_ids)
        if chunk.finish_reason is not None:
            self._finish_reason = chunk.finish_reason
        if chunk.usage is not None:
            self._usage_tokens = chunk.usage.completion_tokens
            self._prompt_tokens = chunk.usage.prompt_tokens

    def finish(self, end: float, failure: str | None = None) -> RequestRecord:
        """The record, once the stream is over; `failure` is a transport or HTTP error."""
        times = self._output_times
        if self._usage_tokens is not None:
            tokens, source = self._usage_tokens, "usage"
        elif self._streamed_token_ids:
            tokens, source = self._streamed_token_ids, "token_ids"
        elif times:
            tokens, source = len(times), "chunks"
        else:
            tokens, source = 0, "none"
        error = failure or self._error
        if error is None and not self._done:
            error = "stream ended before [DONE]"
        expected = self.expected_output_tokens
        if error is None and expected is not None and tokens != expected:
            error = f"asked for exactly {expected} output tokens, got {tokens} ({source})"
        return RequestRecord(
            start=self.start,
            e2e=end,
            ok=error is None,
            error=error,
            ttft=times[0] if times else None,
            itl=tuple(b - a for a, b in itertools.pairwise(times)),
            output_tokens=tokens,
            tokens_from=source,
            prompt_tokens=self._prompt_tokens,
            output_chunks=len(times),
            finish_reason=self._finish_reason,
        )


def measure(
    timed_chunks: Iterable[tuple[float, StreamChunk]],
    end: float,
    start: float = 0.0,
    expected_output_tokens: int | None = None,
    failure: str | None = None,
) -> RequestRecord:
    """Replay a whole stream: (arrival seconds, chunk) pairs, then the end of the stream."""
    measurer = StreamMeasurer(start, expected_output_tokens)
    for at, chunk in timed_chunks:
        measurer.observe(at, chunk)
    return measurer.finish(end, failure)


@dataclass(frozen=True)
class Distribution:
    """Percentiles and mean of one measure, in milliseconds; None when nothing was measured."""

    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls(0, None, None, None, None)
        ms = sorted(v * MS for v in values)
        p50, p90, p99 = (percentile(ms, q) for q in PERCENTILES)
        return cls(len(ms), sum(ms) / len(ms), p50, p90, p99)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as vLLM bench uses)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


SLO_NAMES = ("ttft", "tpot", "e2el")


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """A completed request is good when it meets every SLO (milliseconds)."""
    if not record.ok:
        return False
    observed = {
        "ttft": record.ttft,
        "tpot": record.tpot if record.output_tokens > 1 else 0.0,
        "e2el": record.e2e,
    }
    for name, limit in slos_ms.items():
        value = observed[name]
        if value is None or value * MS > limit:
            return False
    return True


@dataclass(frozen=True)
class Summary:
    """What a run showed. Latencies in ms, throughputs per second over `duration_s`."""

    requests: int
    completed: int
    failed: int
    duration_s: float
    ttft: Distribution
    itl: Distribution
    tpot: Distribution
    e2e: Distribution
    request_throughput: float
    mean_in_flight: float
    output_token_throughput: float
    total_token_throughput: float
    output_tokens: int
    prompt_tokens: int
    slos_ms: dict[str, float] = field(default_factory=dict)
    goodput: float | None = None
    good_requests: int | None = None
    errors: dict[str, int] = field(default_factory=dict)
    server_counters: dict[str, float] | None = None  # None: /metrics could not be read
    server_latency_means_ms: dict[str, float] | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> Summary:
        values = dict(data)
        for name in ("ttft", "itl", "tpot", "e2e"):
            values[name] = Distribution(**values[name])
        return cls(**values)


def summarize(
    records: Sequence[RequestRecord],
    slos_ms: Mapping[str, float] | None = None,
    server_counters: Mapping[str, float] | None = None,
    server_latency_means_ms: Mapping[str, float] | None = None,
) -> Summary:
    slos = dict(slos_ms or {})
    done = [r for r in records if r.ok]
    duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    per_s = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in done)
    good = sum(meets_slos(r, slos) for r in done) if slos else None
    errors = Counter(r.error or "" for r in records if not r.ok)
    return Summary(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        duration_s=duration,
        ttft=Distribution.of_seconds([r.ttft for r in done if r.ttft is not None]),
        itl=Distribution.of_seconds([gap for r in done for gap in r.itl]),
        tpot=Distribution.of_seconds([t for r in done if (t := r.tpot) is not None]),
        e2e=Distribution.of_seconds([r.e2e for r in done]),
        request_throughput=per_s(len(done)),
        mean_in_flight=per_s(sum(r.e2e for r in records)),
        output_token_throughput=per_s(output_tokens),
        total_token_throughput=per_s(output_tokens + prompt_tokens),
        output_tokens=output_tokens,
        prompt_tokens=prompt_tokens,
        slos_ms=slos,
        goodput=per_s(good) if good is not None else None,
        good_requests=good,
        errors=dict(errors.most_common(10)),
        server_counters=dict(server_counters) if server_counters is not None else None,
        server_latency_means_ms=(
            dict(server_latency_means_ms) if server_latency_means_ms is not None else None
        ),
    )
