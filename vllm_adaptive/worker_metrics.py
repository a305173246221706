"""Worker-side figures on the API server's `/metrics`: one snapshot file per worker process.

The adaptive proposer and the sampler processor run in a worker process (inside the engine core
on one device), while `/metrics` is served by the API server, another process. vLLM's own
channel from the engine to the frontend carries vLLM's fixed set of scheduler statistics, so the
plugin uses its own:

- the API server (`serve_worker_metrics`, called when `vllm serve --plugin adaptive` turns the
  plugin on) makes a private temporary folder, names it in the environment variable
  `VLLM_ADAPTIVE_WORKER_METRICS_DIR` before vLLM starts the engine (its processes inherit it),
  and adds a collector to prometheus_client's default registry, the one vLLM serves;
- each worker component that has figures (`SnapshotPublisher`) writes a JSON snapshot of its
  cumulative counters to `<folder>/<kind>-<pid>.json` from a daemon thread, at most every
  `FLUSH_SECONDS` and only after a change (write to a temporary name, then rename: a reader
  never sees half a file);
- at each scrape the collector reads every snapshot and turns the sums into metric families
  (`speculative_families`, `sampler_families`, `routing_families`). Counters are cumulative per
  worker, so summing workers is right.

Without the variable (offline `LLM`, or a server without the plugin) nothing is written; the same
figures are then available through `vllm_adaptive.introspection`.

Known limit: with `--api-server-count` > 1 vLLM serves `/metrics` from prometheus_client's
multiprocess registry, which does not include this collector.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ENV_DIR = "VLLM_ADAPTIVE_WORKER_METRICS_DIR"
FLUSH_SECONDS = 0.5
SPECULATIVE = "speculative"
SAMPLER = "sampler"
ROUTING = "routing"
KVCACHE = "kvcache"  # written by the engine core's compacting scheduler, not a worker
KVWORKER = "kvworker"  # the workers' half of KV compaction (the selections they ran)

_lock = threading.Lock()
_served_dir: Path | None = None


# --- worker side -------------------------------------------------------------------------------


class SnapshotPublisher:
    """Writes `snapshot()` to `<directory>/<kind>-<pid>.json` whenever `touch()` was called since
    the last write, checking every FLUSH_SECONDS on a daemon thread (never on the engine's)."""

    def __init__(self, kind: str, snapshot: Callable[[], dict[str, Any]], directory: Path,
                 interval: float = FLUSH_SECONDS) -> None:
        self.path = directory / f"{kind}-{os.getpid()}.json"
        self._snapshot = snapshot
        self._interval = interval
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._failure_logged = False
        self._thread = threading.Thread(target=self._run, name=f"vllm-adaptive-{kind}-metrics", daemon=True)
        self._thread.start()

    @classmethod
    def from_environment(cls, kind: str, snapshot: Callable[[], dict[str, Any]]) -> SnapshotPublisher | None:
        """A publisher into the folder the API server named, or None when there is none."""
        directory = os.environ.get(ENV_DIR)
        if not directory or not Path(directory).is_dir():
            return None
        return cls(kind, snapshot, Path(directory))

    def touch(self) -> None:
        """The figures changed: write them at the next flush."""
        self._dirty.set()

    def flush(self) -> None:
        """Write the snapshot now (errors are logged once, never raised)."""
        self._dirty.clear()
        try:
            payload = json.dumps(self._snapshot())
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(payload)
            os.replace(tmp, self.path)
        except Exception:
            if not self._failure_logged:
                logger.exception("vllm-adaptive: could not write worker metrics to %s", self.path)
                self._failure_logged = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self._interval)
        if self._dirty.is_set():
            self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            if self._dirty.is_set():
                self.flush()


# --- API server side ---------------------------------------------------------------------------


def read_snapshots(directory: Path, kind: str) -> list[dict[str, Any]]:
    """Every readable `<kind>-*.json` snapshot in `directory` (unreadable ones are skipped)."""
    snapshots = []
    for path in sorted(directory.glob(f"{kind}-*.json")):
        try:
            snapshots.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return snapshots


def _sum_lists(lists: Iterable[list[int]]) -> list[int]:
    total: list[int] = []
    for values in lists:
        if len(values) > len(total):
            total += [0] * (len(values) - len(total))
        for i, value in enumerate(values):
            total[i] += int(value)
    return total


def _failures_by_stage(counters: list[dict[str, Any]]) -> dict[str, int]:
    """Failures summed over workers by stage: every stage a snapshot names (at zero too), and
    `unknown` for failures a worker counted under no stage (only when there are some)."""
    by_stage: dict[str, int] = {}
    for c in counters:
        stages = {str(k): int(v) for k, v in dict(c.get("failure_stages", {})).items()}
        stages["unknown"] = int(c.get("failures", 0)) - sum(stages.values())
        for stage, n in stages.items():
            by_stage[stage] = by_stage.get(stage, 0) + n
    if not by_stage.get("unknown"):
        by_stage.pop("unknown", None)
    return by_stage


def speculative_families(snapshots: list[dict[str, Any]]) -> Iterator[Any]:
    """Prometheus metric families for the adaptive proposers' snapshots (summed over workers)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    if not snapshots:
        return
    counters = [s["counters"] for s in snapshots]

    def total(name: str) -> int:
        return sum(int(c.get(name, 0)) for c in counters)

    lengths = _sum_lists(c.get("length_histogram", []) for c in counters)
    cumulative, buckets = 0, []
    for length, rows in enumerate(lengths):
        cumulative += rows
        buckets.append((str(float(length)), cumulative))
    buckets.append(("+Inf", cumulative))
    yield HistogramMetricFamily(
        "vllm_adaptive:spec_draft_length",
        "Draft tokens proposed per request per engine step by adaptive drafting (0: the stop rule "
        "or the controller left the request undrafted that step).",
        buckets=buckets, sum_value=total("draft_tokens"),
    )
    simple = (
        ("spec_draft_tokens", "draft_tokens", "Draft tokens proposed by adaptive drafting."),
        ("spec_verified_draft_tokens", "verified_tokens",
         "Draft tokens whose verification by the target was observed."),
        ("spec_accepted_draft_tokens", "accepted_tokens",
         "Verified draft tokens the target accepted; acceptance rate = this / "
         "spec_verified_draft_tokens."),
        ("spec_draft_passes", "draft_passes", "Draft-model forward passes run by adaptive drafting."),
    )
    for name, key, documentation in simple:
        family = CounterMetricFamily(f"vllm_adaptive:{name}", documentation)
        family.add_metric([], total(key))
        yield family
    failures = CounterMetricFamily(
        "vllm_adaptive:spec_failures",
        "Engine steps where adaptive drafting failed internally and drafted as vLLM does, by the "
        "stage that failed: feedback (learning from verification), controller (choosing K), "
        "stop_rule (a draft step), finish (collecting drafts and timings), unknown (a worker "
        "that does not report stages).",
        labels=["stage"],
    )
    for stage, n in _failures_by_stage(counters).items():
        failures.add_metric([stage], n)
    yield failures
    verified = total("verified_tokens")
    rate = GaugeMetricFamily(
        "vllm_adaptive:spec_acceptance_rate",
        "Accepted / verified draft tokens since the engine started (NaN before any verification).",
    )
    rate.add_metric([], total("accepted_tokens") / verified if verified else float("nan"))
    yield rate

    ends = CounterMetricFamily(
        "vllm_adaptive:spec_draft_ends",
        "Request drafts by how they ended: 'stop_rule' (the rule fired before the cap), 'cap' "
        "(the draft reached the step's cap K).",
        labels=["reason", "stop_rule"],
    )
    by_rule: dict[str, tuple[int, int]] = {}
    for snapshot, c in zip(snapshots, counters):
        rule = str(snapshot.get("stop_rule", "unknown"))
        fired, capped = by_rule.get(rule, (0, 0))
        by_rule[rule] = (fired + int(c.get("rule_stops", 0)), capped + int(c.get("cap_reached", 0)))
    for rule, (fired, capped) in sorted(by_rule.items()):
        ends.add_metric(["stop_rule", rule], fired)
        ends.add_metric(["cap", rule], capped)
    yield ends

    caps = _sum_lists(c.get("cap_histogram", []) for c in counters)
    decisions = CounterMetricFamily(
        "vllm_adaptive:spec_controller_decisions",
        "Engine steps by the draft-length cap K in force (the goodput controller's decision, or "
        "max_draft_tokens when the controller is off); k='0' means speculation was off that step.",
        labels=["k"],
    )
    for k, steps in enumerate(caps):
        decisions.add_metric([str(k)], steps)
    yield decisions
    current = [s.get("controller_k") for s in snapshots if s.get("controller_k") is not None]
    if current:
        cap = GaugeMetricFamily(
            "vllm_adaptive:spec_controller_cap",
            "The goodput controller's current draft-length cap K (largest over workers).",
        )
        cap.add_metric([], max(int(k) for k in current))
        yield cap
    thresholds = [float(s["specdec_threshold"]) for s in snapshots if s.get("specdec_threshold") is not None]
    if thresholds:
        theta = GaugeMetricFamily(
            "vllm_adaptive:spec_specdec_threshold",
            "The SpecDec++ stop rule's current threshold (1 - the draft cost ratio when "
            "specdec_threshold is 'auto'; smallest over workers).",
        )
        theta.add_metric([], min(thresholds))
        yield theta


def sampler_families(snapshots: list[dict[str, Any]]) -> Iterator[Any]:
    """Prometheus metric families for the sampler processors' snapshots (summed over workers)."""
    from prometheus_client.core import CounterMetricFamily

    if not snapshots:
        return
    by_kind: dict[tuple[str, str], int] = {}
    for snapshot in snapshots:
        for row in snapshot.get("failures", []):
            kind = (str(row["sampler"]), str(row["stage"]))
            by_kind[kind] = by_kind.get(kind, 0) + int(row["requests"])
    failures = CounterMetricFamily(
        "vllm_adaptive:sampler_failures",
        "Requests whose adaptive sampler failed inside the engine and that continued with plain "
        "sampling, by sampler and by the logits-processor stage that failed (update_state or "
        "add_request: admitting the request; apply: a sampling step).",
        labels=["sampler", "stage"],
    )
    for (sampler, stage), requests in sorted(by_kind.items()):
        failures.add_metric([sampler, stage], requests)
    yield failures


def routing_families(snapshots: list[dict[str, Any]]) -> Iterator[Any]:
    """Prometheus metric families for the EAD routing policies' snapshots (summed over workers;
    vllm_adaptive.routing.policy.RoutingPolicy.snapshot). Nothing before a routing worker has run
    a step; `ead_large_fraction` only once EAD requests have tokens (a 0 would read as "the small
    model wrote everything")."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not snapshots:
        return
    counters = [s["counters"] for s in snapshots]

    def total(name: str) -> int:
        return sum(int(c.get(name, 0)) for c in counters)

    def counter(name: str, documentation: str, key: str) -> Any:
        family = CounterMetricFamily(f"vllm_adaptive:{name}", documentation)
        family.add_metric([], total(key))
        return family

    def labelled(name: str, documentation: str, label: str, keys: dict[str, str]) -> Any:
        family = CounterMetricFamily(f"vllm_adaptive:{name}", documentation, labels=[label])
        for value, key in keys.items():
            family.add_metric([value], total(key))
        return family

    yield counter("ead_requests", "Requests that used EAD (Entropy Adaptive Decoding).", "requests")
    yield labelled(
        "ead_tokens",
        "Tokens of EAD requests by the model that wrote them: small (the draft model's, accepted "
        "unverified) or large (the target's: the first token, bonus, verified and recovered "
        "tokens, vetoed positions).",
        "model", {"small": "small_tokens", "large": "large_tokens"})
    small, large = total("small_tokens"), total("large_tokens")
    if small + large:
        fraction = GaugeMetricFamily(
            "vllm_adaptive:ead_large_fraction",
            "Share of EAD requests' tokens the large model wrote since the engine started: "
            "large / (small + large); absent before the first token.")
        fraction.add_metric([], large / (small + large))
        yield fraction
    yield labelled(
        "ead_switches", "Hand-overs between the models in EAD requests, by the model taking over.",
        "to", {"large": "switches_to_large", "small": "switches_to_small"})
    yield _stint_histogram(counters)
    yield counter(
        "ead_target_passes",
        "Sequential target passes of EAD requests ((request, step) pairs that emitted tokens); "
        "per generated token: this / ead_tokens_total summed over model.", "target_passes")
    yield counter("ead_draft_passes", "Draft-model forward passes run in steps with EAD requests.",
                  "draft_passes")
    yield labelled(
        "ead_positions",
        "Positions the plan gave the small model: accepted unverified (forced), or verified "
        "because a constraint of the request forbade the small model's token there (vetoed).",
        "outcome", {"forced": "forced_positions", "vetoed": "vetoed_positions"})
    yield counter(
        "ead_bonus_dropped",
        "Steps of EAD requests whose draft ended on a small-model position, so that the "
        "target's token after it was dropped (that position's owner is decided at the next "
        "step).", "bonus_dropped")
    yield counter(
        "ead_plan_mismatches",
        "EAD rows whose scheduled draft was not the planned one (verified losslessly).",
        "plan_mismatches")
    failures = CounterMetricFamily(
        "vllm_adaptive:ead_failures",
        "Engine steps where EAD routing failed internally, by the stage that failed: commit "
        "(learning what verification emitted; the step still routes, from the previous machine "
        "state), begin (reading the requests' EAD knobs, starting the draft), draft (the "
        "switching machine at a draft step), finish (building the drafts and plan), gate "
        "(forcing positions at verification); the others verify the step losslessly.",
        labels=["stage"],
    )
    for stage, n in _failures_by_stage(counters).items():
        failures.add_metric([stage], n)
    yield failures


def _stint_histogram(counters: list[dict[str, Any]]) -> Any:
    """`ead_stint_length` from the policies' `stint_histogram` (one count per bucket of
    STINT_BUCKETS, then one for longer stints) and `stint_tokens` (the lengths' sum)."""
    from prometheus_client.core import HistogramMetricFamily

    from vllm_adaptive.routing.policy import STINT_BUCKETS

    counts = _sum_lists(c.get("stint_histogram", []) for c in counters)
    counts += [0] * (len(STINT_BUCKETS) + 1 - len(counts))
    cumulative, buckets = 0, []
    for bound, stints in zip(STINT_BUCKETS, counts):
        cumulative += stints
        buckets.append((str(float(bound)), cumulative))
    buckets.append(("+Inf", sum(counts)))
    return HistogramMetricFamily(
        "vllm_adaptive:ead_stint_length",
        "Completed stints of EAD requests: positions one model wrote before handing over.",
        buckets=buckets,
        sum_value=sum(int(c.get("stint_tokens", 0)) for c in counters),
    )


def kvcache_families(snapshots: list[dict[str, Any]]) -> Iterator[Any]:
    """Prometheus metric families for KV compaction (vllm_adaptive.kvcache.scheduler
    CompactingScheduler.kv_snapshot, summed over engine cores). Nothing before one has started."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    if not snapshots:
        return

    def total(key: str) -> int:
        return sum(int(s.get(key, 0)) for s in snapshots)

    for name, key, documentation in (
        ("kv_requests", "requests", "Requests that asked for KV compaction (kv_budget)."),
        ("kv_compactions", "compactions", "Compactions run (after a prompt, or at budget + buffer during decode)."),
        ("kv_tokens_evicted", "tokens_evicted", "Tokens evicted from compacted requests' caches."),
        ("kv_blocks_freed", "blocks_freed", "KV cache blocks given back to vLLM's pool by compactions."),
        ("kv_refused", "refused", "Compactions not run: a kept block was shared, or the request's kv_* "
                                  "values reached the engine unchecked (served without compaction)."),
        ("kv_unmeasured", "unmeasured", "Requests with kv_budget \"entropy\" whose window the workers could not "
                                        "measure (served without compaction; the workers log why)."),
    ):
        family = CounterMetricFamily(f"vllm_adaptive:{name}", documentation)
        family.add_metric([], total(key))
        yield family
    for name, key, documentation in (
        ("kv_free_blocks", "free_blocks", "Free blocks in vLLM's KV pool (cached but unreferenced ones included), "
                                          "as of the compacting scheduler's last change."),
        ("kv_pool_blocks", "pool_blocks", "Usable blocks in vLLM's KV pool."),
    ):
        gauge = GaugeMetricFamily(f"vllm_adaptive:{name}", documentation)
        gauge.add_metric([], total(key))
        yield gauge
    held, kept = total("tokens_held"), total("tokens_kept")
    if kept:
        ratio = GaugeMetricFamily(
            "vllm_adaptive:kv_compression_ratio",
            "Tokens held before compaction / tokens kept, over every compaction since start.")
        ratio.add_metric([], held / kept)
        yield ratio


def kvworker_families(snapshots: list[dict[str, Any]]) -> Iterator[Any]:
    """Prometheus metric families for the workers' half of KV compaction
    (vllm_adaptive.kvcache.worker WorkerKV.snapshot, summed over workers; under tensor
    parallelism every rank runs each compaction, so these count rank-compactions)."""
    from prometheus_client.core import CounterMetricFamily

    if not snapshots:
        return
    for name, key, documentation in (
        ("kv_scored_compactions", "scored", "Compactions whose kept tokens a scorer chose (snapkv, keynorm)."),
        ("kv_degraded", "degraded", "Compactions of a scored policy that fell back to the streaming selection "
                                    "(no queries recorded, or the scorer failed; logged)."),
        ("kv_failed", "failed", "Compactions run inside the attention layers that did not reach every layer "
                                "(that request's cache is stale; logged)."),
    ):
        family = CounterMetricFamily(f"vllm_adaptive:{name}", documentation)
        family.add_metric([], sum(int(s.get(key, 0)) for s in snapshots))
        yield family


class WorkerMetricsCollector:
    """A prometheus_client collector over the snapshot folder (reads it at every scrape)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        for kind, families in ((SPECULATIVE, speculative_families), (SAMPLER, sampler_families),
                               (ROUTING, routing_families), (KVCACHE, kvcache_families),
                               (KVWORKER, kvworker_families)):
            try:
                yield from families(read_snapshots(self.directory, kind))
            except Exception:
                logger.exception("vllm-adaptive: could not read %s worker metrics from %s", kind,
                                 self.directory)


def serve_worker_metrics() -> Path:
    """In the API server, before the engine starts: make the snapshot folder, name it in the
    environment for the engine's processes, and register the collector (once per process)."""
    global _served_dir
    with _lock:
        if _served_dir is not None:
            return _served_dir
        from prometheus_client import REGISTRY

        directory = Path(tempfile.mkdtemp(prefix="vllm-adaptive-metrics-"))
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        os.environ[ENV_DIR] = str(directory)
        REGISTRY.register(WorkerMetricsCollector(directory))  # type: ignore[arg-type]
        _served_dir = directory
        return directory
