"""The worker-to-/metrics channel (vllm_adaptive.worker_metrics): snapshot files in, Prometheus out."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from vllm_adaptive.routing.config import RoutingConfig
from vllm_adaptive.routing.policy import FAILURE_STAGES as ROUTING_FAILURE_STAGES
from vllm_adaptive.routing.policy import STINT_BUCKETS, RoutingPolicy
from vllm_adaptive.speculative.config import AdaptiveDraftConfig
from vllm_adaptive.speculative.policy import DraftLengthPolicy
from vllm_adaptive.worker_metrics import (
    ENV_DIR,
    ROUTING,
    SAMPLER,
    SPECULATIVE,
    SnapshotPublisher,
    WorkerMetricsCollector,
    read_snapshots,
)


def scrape(directory: Path) -> dict[str, float]:
    """Sample name{labels} -> value, as a Prometheus server would read /metrics."""
    registry = CollectorRegistry()
    registry.register(WorkerMetricsCollector(directory))  # type: ignore[arg-type]
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def snapshot(rule: str, lengths: list[int], caps: list[int], **counters: int) -> dict:
    return {"stop_rule": rule, "max_draft_tokens": len(lengths) - 1, "controller_k": counters.pop("k", None),
            "counters": {"length_histogram": lengths, "cap_histogram": caps, **counters}}


def write(directory: Path, name: str, payload: dict) -> None:
    (directory / f"{SPECULATIVE}-{name}.json").write_text(json.dumps(payload))


def test_two_workers_are_summed_into_histogram_counters_and_gauges(tmp_path: Path) -> None:
    write(tmp_path, "1", snapshot("specdec", [2, 1, 0, 3], [0, 0, 1, 3], draft_tokens=10, verified_tokens=8,
                                  accepted_tokens=6, draft_passes=9, rule_stops=3, cap_reached=3, failures=0, k=3))
    write(tmp_path, "2", snapshot("specdec", [0, 0, 4, 0], [0, 0, 2, 0], draft_tokens=8, verified_tokens=8,
                                  accepted_tokens=2, draft_passes=4, rule_stops=0, cap_reached=4, failures=3, k=2,
                                  failure_stages={"feedback": 0, "controller": 0, "stop_rule": 2, "finish": 0}))
    s = scrape(tmp_path)
    # Draft lengths 0..3: rows 2, 1, 4, 3 -> cumulative buckets 2, 3, 7, 10.
    assert s["vllm_adaptive:spec_draft_length_bucket{le=0.0}"] == 2
    assert s["vllm_adaptive:spec_draft_length_bucket{le=1.0}"] == 3
    assert s["vllm_adaptive:spec_draft_length_bucket{le=2.0}"] == 7
    assert s["vllm_adaptive:spec_draft_length_bucket{le=+Inf}"] == 10
    assert s["vllm_adaptive:spec_draft_length_count{}"] == 10
    assert s["vllm_adaptive:spec_draft_length_sum{}"] == 18
    assert s["vllm_adaptive:spec_draft_tokens_total{}"] == 18
    assert s["vllm_adaptive:spec_verified_draft_tokens_total{}"] == 16
    assert s["vllm_adaptive:spec_accepted_draft_tokens_total{}"] == 8
    assert s["vllm_adaptive:spec_acceptance_rate{}"] == pytest.approx(0.5)
    assert s["vllm_adaptive:spec_draft_passes_total{}"] == 13
    # By stage; worker 2 counted one failure under no stage (a worker that does not report them).
    assert s["vllm_adaptive:spec_failures_total{stage=stop_rule}"] == 2
    assert s["vllm_adaptive:spec_failures_total{stage=unknown}"] == 1
    assert s["vllm_adaptive:spec_failures_total{stage=feedback}"] == 0
    assert s["vllm_adaptive:spec_draft_ends_total{reason=stop_rule,stop_rule=specdec}"] == 3
    assert s["vllm_adaptive:spec_draft_ends_total{reason=cap,stop_rule=specdec}"] == 7
    assert s["vllm_adaptive:spec_controller_decisions_total{k=2}"] == 3
    assert s["vllm_adaptive:spec_controller_decisions_total{k=3}"] == 3
    assert s["vllm_adaptive:spec_controller_decisions_total{k=0}"] == 0
    assert s["vllm_adaptive:spec_controller_cap{}"] == 3


def test_no_snapshot_means_no_speculative_metrics_and_a_bad_file_is_skipped(tmp_path: Path) -> None:
    assert scrape(tmp_path) == {}
    (tmp_path / f"{SPECULATIVE}-9.json").write_text("{not json")
    assert read_snapshots(tmp_path, SPECULATIVE) == []
    assert scrape(tmp_path) == {}


def test_publisher_writes_the_policy_counters_after_a_change_only(tmp_path: Path) -> None:
    policy = DraftLengthPolicy(AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="none",
                                                   controller=False))
    publisher = SnapshotPublisher(SPECULATIVE, policy.metrics_snapshot, tmp_path, interval=0.05)
    try:
        time.sleep(0.2)
        assert not publisher.path.exists()  # nothing changed yet: nothing written
        draft = policy.begin(["a", "b"], [True, True], 1)  # cap K = 1
        logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
        draft.record(logits, logits.argmax(dim=-1), None)
        assert policy.finish(draft, ["a", "b"], [True, True]) == [[0], [2]]
        publisher.touch()
        deadline = time.monotonic() + 5
        while not publisher.path.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        publisher.close()
    assert publisher.path.name == f"{SPECULATIVE}-{os.getpid()}.json"
    s = scrape(tmp_path)
    assert s["vllm_adaptive:spec_draft_length_bucket{le=0.0}"] == 0
    assert s["vllm_adaptive:spec_draft_length_bucket{le=1.0}"] == 2
    assert s["vllm_adaptive:spec_draft_ends_total{reason=cap,stop_rule=none}"] == 2
    assert s["vllm_adaptive:spec_draft_ends_total{reason=stop_rule,stop_rule=none}"] == 0
    assert s["vllm_adaptive:spec_controller_decisions_total{k=1}"] == 1
    assert "vllm_adaptive:spec_controller_cap{}" not in s  # controller off: no cap gauge
    assert list(tmp_path.glob(".*.tmp")) == []  # written by rename


def test_publisher_needs_the_folder_the_api_server_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DIR, raising=False)
    assert SnapshotPublisher.from_environment(SPECULATIVE, dict) is None
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "gone"))
    assert SnapshotPublisher.from_environment(SPECULATIVE, dict) is None
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    publisher = SnapshotPublisher.from_environment(SPECULATIVE, dict)
    assert publisher is not None and publisher.path.parent == tmp_path
    publisher.close()


def test_specdec_threshold_gauge_is_the_smallest_over_workers(tmp_path: Path) -> None:
    for name, theta in (("1", 0.8), ("2", 0.75)):
        payload = snapshot("specdec", [1], [1], draft_tokens=0)
        payload["specdec_threshold"] = theta
        write(tmp_path, name, payload)
    assert scrape(tmp_path)["vllm_adaptive:spec_specdec_threshold{}"] == pytest.approx(0.75)


def sampler_snapshot(**failed: int) -> dict:
    """A sampler processor's snapshot: every (sampler, stage) at zero unless `failed` names it
    as sampler__stage=requests."""
    rows = {("typical", "update_state"): 0, ("typical", "apply"): 0,
            ("mirostat_v2", "update_state"): 0, ("mirostat_v2", "apply"): 0}
    for key, requests in failed.items():
        sampler, stage = key.split("__")
        rows[(sampler, stage)] = requests
    return {"runner_interface": "v1", "failures": [
        {"sampler": sampler, "stage": stage, "requests": requests} for (sampler, stage), requests in rows.items()
    ]}


def test_sampler_failures_are_summed_over_workers_by_sampler_and_stage(tmp_path: Path) -> None:
    (tmp_path / f"{SAMPLER}-1.json").write_text(json.dumps(sampler_snapshot(typical__apply=2)))
    (tmp_path / f"{SAMPLER}-2.json").write_text(
        json.dumps(sampler_snapshot(typical__apply=1, mirostat_v2__update_state=4)))
    s = scrape(tmp_path)
    assert s["vllm_adaptive:sampler_failures_total{sampler=typical,stage=apply}"] == 3
    assert s["vllm_adaptive:sampler_failures_total{sampler=mirostat_v2,stage=update_state}"] == 4
    assert s["vllm_adaptive:sampler_failures_total{sampler=typical,stage=update_state}"] == 0
    assert s["vllm_adaptive:sampler_failures_total{sampler=mirostat_v2,stage=apply}"] == 0
    assert not any(name.startswith("vllm_adaptive:spec_") for name in s)  # no proposer here


def test_sampler_and_speculative_snapshots_share_the_folder(tmp_path: Path) -> None:
    write(tmp_path, "1", snapshot("none", [1], [1], draft_tokens=0, failures=2))
    (tmp_path / f"{SAMPLER}-1.json").write_text("{not json")  # a bad sampler file is skipped
    (tmp_path / f"{SAMPLER}-2.json").write_text(json.dumps(sampler_snapshot(typical__update_state=5)))
    s = scrape(tmp_path)
    assert s["vllm_adaptive:spec_failures_total{stage=unknown}"] == 2  # a snapshot without stages
    assert s["vllm_adaptive:sampler_failures_total{sampler=typical,stage=update_state}"] == 5


def routing_snapshot(stages: dict[str, int], **counters: object) -> dict:
    """A routing policy's snapshot (RoutingPolicy.snapshot) with the counters given."""
    return {"config": {"enabled": True}, "num_speculative_tokens": 4,
            "counters": {**counters, "failures": sum(stages.values()), "failure_stages": stages}}


def write_routing(directory: Path, name: str, payload: dict) -> None:
    (directory / f"{ROUTING}-{name}.json").write_text(json.dumps(payload))


def test_ead_figures_of_two_workers_are_summed(tmp_path: Path) -> None:
    write_routing(tmp_path, "1", routing_snapshot(
        {"commit": 0, "begin": 0, "draft": 2, "finish": 0, "gate": 0},
        requests=3, small_tokens=40, large_tokens=20, target_passes=25, draft_passes=30,
        switches_to_large=4, switches_to_small=3, stint_histogram=[2, 1, 0, 3, 0, 0, 0, 0, 0, 1], stint_tokens=300,
        forced_positions=44, vetoed_positions=2, bonus_dropped=5, plan_mismatches=1))
    write_routing(tmp_path, "2", routing_snapshot(
        {"commit": 0, "begin": 0, "draft": 0, "finish": 0, "gate": 3},
        requests=1, small_tokens=0, large_tokens=20, target_passes=20, draft_passes=5,
        switches_to_large=0, switches_to_small=0, stint_histogram=[0, 0, 1, 0, 0, 0, 0, 0, 0, 0], stint_tokens=3,
        forced_positions=0, vetoed_positions=0, bonus_dropped=0, plan_mismatches=2))
    s = scrape(tmp_path)
    assert s["vllm_adaptive:ead_requests_total{}"] == 4
    assert s["vllm_adaptive:ead_tokens_total{model=small}"] == 40
    assert s["vllm_adaptive:ead_tokens_total{model=large}"] == 40
    assert s["vllm_adaptive:ead_large_fraction{}"] == pytest.approx(0.5)
    assert s["vllm_adaptive:ead_switches_total{to=large}"] == 4
    assert s["vllm_adaptive:ead_switches_total{to=small}"] == 3
    # Stints per bucket 1, 2, 4, 8, ..., 256, longer: 2, 1, 1, 3, 0, ..., 0, 1.
    bounds = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0", "+Inf")
    stints = {le: s[f"vllm_adaptive:ead_stint_length_bucket{{le={le}}}"] for le in bounds}
    assert stints == {"1.0": 2, "2.0": 3, "4.0": 4, "8.0": 7, "16.0": 7, "32.0": 7, "64.0": 7,
                      "128.0": 7, "256.0": 7, "+Inf": 8}
    assert s["vllm_adaptive:ead_stint_length_count{}"] == 8
    assert s["vllm_adaptive:ead_stint_length_sum{}"] == 303
    assert s["vllm_adaptive:ead_target_passes_total{}"] == 45
    assert s["vllm_adaptive:ead_draft_passes_total{}"] == 35
    assert s["vllm_adaptive:ead_positions_total{outcome=forced}"] == 44
    assert s["vllm_adaptive:ead_positions_total{outcome=vetoed}"] == 2
    assert s["vllm_adaptive:ead_bonus_dropped_total{}"] == 5
    assert s["vllm_adaptive:ead_plan_mismatches_total{}"] == 3
    failures = {name: n for name, n in s.items() if name.startswith("vllm_adaptive:ead_failures_total")}
    assert failures == {"vllm_adaptive:ead_failures_total{stage=commit}": 0,
                        "vllm_adaptive:ead_failures_total{stage=begin}": 0,
                        "vllm_adaptive:ead_failures_total{stage=draft}": 2,
                        "vllm_adaptive:ead_failures_total{stage=finish}": 0,
                        "vllm_adaptive:ead_failures_total{stage=gate}": 3}
    assert not any(name.startswith(("vllm_adaptive:spec_", "vllm_adaptive:sampler_")) for name in s)


def test_ead_large_fraction_is_absent_before_the_first_token(tmp_path: Path) -> None:
    write_routing(tmp_path, "1", routing_snapshot(
        {"commit": 0, "begin": 1, "draft": 0, "finish": 0, "gate": 0}, requests=2, small_tokens=0,
        large_tokens=0))
    s = scrape(tmp_path)
    assert s["vllm_adaptive:ead_tokens_total{model=small}"] == 0
    assert s["vllm_adaptive:ead_tokens_total{model=large}"] == 0
    assert s["vllm_adaptive:ead_failures_total{stage=begin}"] == 1
    assert "vllm_adaptive:ead_large_fraction{}" not in s


def test_a_routing_policys_snapshot_gives_every_ead_family_and_stage(tmp_path: Path) -> None:
    policy = RoutingPolicy(RoutingConfig(enabled=True), num_speculative_tokens=4)
    policy.counters.small_tokens, policy.counters.large_tokens = 3, 1
    policy.record_failure("finish")
    policy.add_gate_counts(mismatched=2, failures=1)
    publisher = SnapshotPublisher(ROUTING, policy.snapshot, tmp_path)
    publisher.flush()
    publisher.close()
    s = scrape(tmp_path)
    assert s["vllm_adaptive:ead_large_fraction{}"] == pytest.approx(0.25)
    assert s["vllm_adaptive:ead_plan_mismatches_total{}"] == 2
    assert {name for name in s if name.startswith("vllm_adaptive:ead_failures_total")} == {
        f"vllm_adaptive:ead_failures_total{{stage={stage}}}" for stage in ROUTING_FAILURE_STAGES}
    assert s["vllm_adaptive:ead_failures_total{stage=finish}"] == 1
    assert s["vllm_adaptive:ead_failures_total{stage=gate}"] == 1
    buckets = [name for name in s if name.startswith("vllm_adaptive:ead_stint_length_bucket")]
    les = [str(float(b)) for b in STINT_BUCKETS] + ["+Inf"]
    assert buckets == [f"vllm_adaptive:ead_stint_length_bucket{{le={le}}}" for le in les]
    families = {name.split("{")[0] for name in s}
    assert families == {
        "vllm_adaptive:ead_requests_total", "vllm_adaptive:ead_tokens_total",
        "vllm_adaptive:ead_large_fraction", "vllm_adaptive:ead_switches_total",
        "vllm_adaptive:ead_stint_length_bucket", "vllm_adaptive:ead_stint_length_count",
        "vllm_adaptive:ead_stint_length_sum", "vllm_adaptive:ead_target_passes_total",
        "vllm_adaptive:ead_draft_passes_total", "vllm_adaptive:ead_positions_total",
        "vllm_adaptive:ead_bonus_dropped_total", "vllm_adaptive:ead_plan_mismatches_total",
        "vllm_adaptive:ead_failures_total"}


def test_kv_compaction_figures_of_two_engine_cores_are_summed(tmp_path: Path) -> None:
    from vllm_adaptive.worker_metrics import KVCACHE

    first = {"requests": 3, "compactions": 4, "tokens_held": 400, "tokens_kept": 100, "tokens_evicted": 300,
             "blocks_freed": 9, "refused": 1, "unmeasured": 2, "free_blocks": 10, "pool_blocks": 12}
    second = {"requests": 1, "compactions": 1, "tokens_held": 100, "tokens_kept": 60, "tokens_evicted": 40,
              "blocks_freed": 1, "refused": 0, "free_blocks": 12, "pool_blocks": 12}
    for pid, payload in ((1, first), (2, second)):
        (tmp_path / f"{KVCACHE}-{pid}.json").write_text(json.dumps(payload))
    figures = scrape(tmp_path)
    assert figures["vllm_adaptive:kv_requests_total{}"] == 4
    assert figures["vllm_adaptive:kv_compactions_total{}"] == 5
    assert figures["vllm_adaptive:kv_tokens_evicted_total{}"] == 340
    assert figures["vllm_adaptive:kv_blocks_freed_total{}"] == 10
    assert figures["vllm_adaptive:kv_refused_total{}"] == 1
    assert figures["vllm_adaptive:kv_unmeasured_total{}"] == 2
    assert figures["vllm_adaptive:kv_compression_ratio{}"] == pytest.approx(500 / 160)
    assert figures["vllm_adaptive:kv_free_blocks{}"] == 22 and figures["vllm_adaptive:kv_pool_blocks{}"] == 24


def test_no_kv_snapshot_means_no_kv_metrics(tmp_path: Path) -> None:
    assert not any(name.startswith("vllm_adaptive:kv_") for name in scrape(tmp_path))


def test_kv_selection_figures_of_the_workers_are_summed(tmp_path: Path) -> None:
    from vllm_adaptive.worker_metrics import KVWORKER

    for pid, payload in ((1, {"compactions": 5, "scored": 4, "degraded": 1, "failed": 0}),
                         (2, {"compactions": 2, "scored": 2, "degraded": 0, "failed": 2})):
        (tmp_path / f"{KVWORKER}-{pid}.json").write_text(json.dumps(payload))
    figures = scrape(tmp_path)
    assert figures["vllm_adaptive:kv_scored_compactions_total{}"] == 6
    assert figures["vllm_adaptive:kv_degraded_total{}"] == 1
    assert figures["vllm_adaptive:kv_failed_total{}"] == 2
