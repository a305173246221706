"""benchmarks/speculative.py end to end through real engines, on the tiny random model and its
one-layer draft (tests/draft_models.py): a table row for every configuration and workload, and
greedy outputs identical to no speculation in every configuration. Nothing here is timed."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draft_models import ensure_truncated_draft

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]


def test_speculative_benchmark_runs_each_configuration_and_every_one_is_lossless(
    tiny_model: Path, tmp_path: Path
) -> None:
    draft = ensure_truncated_draft(tiny_model, num_layers=1)
    out = tmp_path / "spec"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speculative", "--target", str(tiny_model), "--draft", str(draft),
         "--tasks", "text", "--ks", "1", "--adaptive-k", "2", "--configs", "k1,adaptive",
         "--batch1-prompts", "1", "--batch-sizes", "3", "--mixed", "3", "--repeats", "1", "--out", str(out)],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["config"], r["task"], r["batch"]) for r in rows) == sorted(
        (c, t, b) for c in ("none", "k1", "adaptive") for t, b in (("text", "1"), ("text", "3"), ("mixed", "3")))
    for row in rows:
        assert float(row["identical"]) == 1.0, row  # greedy: every method is lossless
        for column in ("tokens_per_s", "speedup", "accepted_length", "target_passes_per_token"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, row
    by = {(r["config"], r["batch"]): r for r in rows if r["task"] == "text"}
    assert float(by[("none", "1")]["accepted_length"]) == 1.0
    assert float(by[("none", "1")]["draft_passes_per_token"]) == 0.0
    # vLLM's fixed K = 1 runs one draft pass per engine step
    assert float(by[("k1", "1")]["draft_passes_per_token"]) == pytest.approx(
        float(by[("k1", "1")]["target_passes_per_token"]))
    assert float(by[("k1", "1")]["modelled_speedup"]) > 0 and by[("k1", "3")]["modelled_speedup"] == ""
    table = (out / "table.md").read_text()
    assert "| text | 1 | adaptive |" in table and "modelled" in table
