"""benchmarks.policy_cost writes its table: one row per (stop rule, controller, batch).

A smoke test of the script's plumbing with few steps and given target step times (no timing is
asserted: tests never time things).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks import policy_cost


def test_policy_cost_writes_a_row_per_rule_controller_and_batch(tmp_path: Path) -> None:
    status = policy_cost.main([
        "--batch-sizes", "1,3", "--stop-rules", "specdec,adaedl", "--steps", "4", "--warmup", "1",
        "--target-step-ms", "1=8,3=10", "--clock", "cpu", "--out", str(tmp_path),
    ])
    assert status == 0
    with open(tmp_path / "policy_cost.csv") as f:
        rows = list(csv.DictReader(f))
    cells = [(r["stop_rule"], r["controller"], r["math"], r["batch"]) for r in rows]
    assert cells == [(rule, controller, math, batch) for rule in ("specdec", "adaedl")
                     for controller in ("False", "True") for math in ("host", "device")
                     for batch in ("1", "3")]
    for row in rows:
        assert float(row["policy_ms_median"]) >= 0
        assert row["target_source"] == "given"
        assert float(row["target_step_ms"]) == {"1": 8.0, "3": 10.0}[row["batch"]]
        assert 0 < float(row["draft_steps_mean"]) <= policy_cost.MAX_DRAFT_TOKENS
    assert "| specdec | on | device | 3 |" in (tmp_path / "policy_cost.md").read_text()


def test_policy_cost_refuses_an_unknown_stop_rule(tmp_path: Path) -> None:
    assert policy_cost.main(["--stop-rules", "nope", "--out", str(tmp_path)]) == 2


def test_policy_cost_refuses_an_unknown_math(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        policy_cost.main(["--math", "gpu", "--out", str(tmp_path)])


def test_policy_cost_measures_the_ead_routing_policy(tmp_path: Path) -> None:
    status = policy_cost.main([
        "--batch-sizes", "1,4", "--stop-rules", "ead", "--ead-k", "3", "--steps", "6", "--warmup", "1",
        "--target-step-ms", "1=8,4=10", "--clock", "cpu", "--out", str(tmp_path),
    ])
    assert status == 0
    with open(tmp_path / "policy_cost.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["stop_rule"], r["controller"], r["math"], r["batch"]) for r in rows] == [
        ("ead", "False", math, batch) for math in ("host", "device") for batch in ("1", "4")]
    for row in rows:
        # Speculative rows draft all K steps; a row's draft is K tokens long.
        assert float(row["draft_steps_mean"]) == 3 and float(row["draft_length_mean"]) == 3
        assert float(row["policy_ms_median"]) > 0
