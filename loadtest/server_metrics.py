"""The server's Prometheus metrics before and after a run, and what the run added to them.

Reads vLLM's `/metrics` (text exposition format) and keeps, for metrics whose names start with
`vllm:` (the engine's) or `vllm_adaptive:` (this plugin's, see vllm_adaptive/metrics.py):
- counters, each sample keyed as `name_total{label="value",...}` (labels sorted);
- latency histograms (`*_seconds`), as sum and count over all label sets, so that the run's
  mean as the server saw it (time to first token, inter-token latency, queueing, ...) can be
  set beside the client's measures. vLLM times these in the engine; the client's figures also
  include the API server's work and the network.
Gauges are left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import requests
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("vllm:", "vllm_adaptive:")


@dataclass(frozen=True)
class Scrape:
    counters: dict[str, float]
    latency_histograms: dict[str, tuple[float, float]]  # name -> (sum of seconds, count)


def parse_metrics(exposition: str) -> Scrape:
    counters: dict[str, float] = {}
    histograms: dict[str, tuple[float, float]] = {}
    for family in text_string_to_metric_families(exposition):
        if not family.name.startswith(PREFIXES):
            continue
        if family.type == "counter":
            for sample in family.samples:
                if sample.name == family.name + "_total":
                    counters[_key(sample.name, sample.labels)] = float(sample.value)
        elif family.type == "histogram" and family.name.endswith("_seconds"):
            total = sum(s.value for s in family.samples if s.name == family.name + "_sum")
            count = sum(s.value for s in family.samples if s.name == family.name + "_count")
            histograms[family.name] = (float(total), float(count))
    return Scrape(counters, histograms)


def parse_counters(exposition: str) -> dict[str, float]:
    return parse_metrics(exposition).counters


def _key(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


def scrape(base_url: str, timeout_s: float = 10.0) -> Scrape | None:
    """The metrics now, or None when the server has no readable /metrics."""
    try:
        response = requests.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s)
    except requests.RequestException:
        return None
    if response.status_code != 200:
        return None
    return parse_metrics(response.text)


def counter_deltas(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """What each counter gained between the two scrapes; unchanged counters are left out."""
    deltas: dict[str, float] = {}
    for key, value in sorted(after.items()):
        gained = value - before.get(key, 0.0)
        if gained != 0:
            deltas[key] = gained
    return deltas


def latency_means_ms(
    before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    """Mean of each latency histogram's observations between the scrapes, in milliseconds."""
    means: dict[str, float] = {}
    for name, (total, count) in sorted(after.items()):
        total_before, count_before = before.get(name, (0.0, 0.0))
        if count > count_before:
            means[name] = (total - total_before) / (count - count_before) * 1000.0
    return means
