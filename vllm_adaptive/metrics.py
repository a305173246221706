"""Prometheus metrics under the `vllm_adaptive:` prefix, served on vLLM's own `/metrics`.

They are created lazily, in the process that serves `/metrics` (the API server, where requests
are admitted), in prometheus_client's default registry, which vLLM exposes; when vLLM runs
several API servers it sets PROMETHEUS_MULTIPROC_DIR and prometheus_client aggregates them.
Figures counted inside the engine's workers (sampler failures, adaptive drafting) reach the same
`/metrics` through `vllm_adaptive.worker_metrics`.
"""

from __future__ import annotations

import threading

from prometheus_client import Counter

_lock = threading.Lock()
_requests: Counter | None = None
_rejected: Counter | None = None


def _counters() -> tuple[Counter, Counter]:
    global _requests, _rejected
    with _lock:
        if _requests is None or _rejected is None:
            _requests = Counter(
                "vllm_adaptive:requests",
                "Requests admitted by a server running --plugin adaptive, by the adaptive "
                "sampler they chose ('none' for plain sampling).",
                labelnames=["sampler"],
            )
            _rejected = Counter(
                "vllm_adaptive:rejected_requests",
                "Requests refused at admission (HTTP 400) for a bad adaptive argument, by parameter.",
                labelnames=["parameter"],
            )
        return _requests, _rejected


def count_request(sampler: str) -> None:
    _counters()[0].labels(sampler=sampler).inc()


def count_rejected(parameter: str) -> None:
    _counters()[1].labels(parameter=parameter).inc()
