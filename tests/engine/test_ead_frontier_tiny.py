"""benchmarks/ead_frontier.py end to end through real engines on the tiny random pair (the tiny
model and its one-layer draft, tests/draft_models.py): every row, every file, fractions that
make sense. Accuracy on the tiny pair is 0 (random weights); nothing here is timed.

The tiny models' entropies are 8-10 bits (a vocabulary of 1024: at most 10), so at tau 10 the
small model writes every position but the first (the target's, from the prefill) and at tau 8
the large model writes about all of them. Seven engines start (five configurations, and the
control's two in one process); to keep that near 2-3 minutes on 2 cores they run eager and with
the engine core in the calling process (VLLM_ENABLE_V1_MULTIPROCESSING=0: start-up ~4 s instead
of ~40 s here; the same outputs as with the engine core in its own process, seen on this pair).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from draft_models import ensure_truncated_draft

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
TASKS = ("arith", "text")


@pytest.fixture(scope="module")
def frontier(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    draft = ensure_truncated_draft(tiny_model, num_layers=1)
    out = tmp_path_factory.mktemp("ead-frontier")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ead_frontier", "--target", str(tiny_model), "--draft", str(draft),
         "--tasks", ",".join(TASKS), "--n", "4", "--taus", "8,10", "--ks", "2", "--repeats", "1",
         "--control-prompts", "2", "--batch1-prompts", "1", "--max-tokens", "arith=16,text=16",
         "--kv-cache-bytes", str(64 << 20), "--engine-args", json.dumps({"dtype": "float32", "enforce_eager": True}),
         "--out", str(out)],
        cwd=REPO, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, capture_output=True, text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def rows_of(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_every_file_is_written_and_the_table_printed(frontier: tuple[Path, str]) -> None:
    out, stdout = frontier
    for name in ("results.json", "results.csv", "table.md", "runs.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    assert "| ead-faithful@10 | 10 |" in table and "Checks on arith" in table
    assert table.strip() in stdout


def test_every_configuration_and_tau_has_a_row_and_the_control_mirrors_mixed_faithful_rows(
    frontier: tuple[Path, str],
) -> None:
    rows = rows_of(frontier[0])
    engines = {"small", "large", "fixed-2", *(f"ead-{m}@{t}" for m in ("faithful", "speculative") for t in (8, 10))}
    assert engines <= set(rows)
    mixed = {float(r["tau"]) for name, r in rows.items()
             if r["kind"] == "ead-faithful" and 0 < float(r["large_fraction_arith"]) < 1}
    controls = {name: float(r["tau"]) for name, r in rows.items() if r["kind"] == "random"}
    assert set(rows) == engines | set(controls)
    assert set(controls.values()) == mixed and 10.0 in mixed  # tau 10: every position but the first is small's


def test_large_fractions_lie_in_0_1_and_fall_as_tau_rises(frontier: tuple[Path, str]) -> None:
    rows = rows_of(frontier[0])
    for row in rows.values():
        for task in TASKS:
            assert 0.0 <= float(row[f"large_fraction_{task}"]) <= 1.0, row
    for task in TASKS:
        assert float(rows["small"][f"large_fraction_{task}"]) == 0.0
        assert float(rows["large"][f"large_fraction_{task}"]) == float(rows["fixed-2"][f"large_fraction_{task}"]) == 1.0
        for mode in ("faithful", "speculative"):
            low, high = (float(rows[f"ead-{mode}@{t}"][f"large_fraction_{task}"]) for t in (10, 8))
            assert 0 < low < high, (mode, task, low, high)  # the first token is always the large model's


def test_engine_rows_have_speeds_and_passes_and_the_control_has_neither(frontier: tuple[Path, str]) -> None:
    for row in rows_of(frontier[0]).values():
        timed = row["kind"] != "random"
        for column in ("tokens_per_s_all", "tokens_per_s_batch1"):
            assert (float(row[column]) > 0) if timed else row[column] == "", row
        assert (float(row["target_passes_per_token"]) >= 0) if timed else row["target_passes_per_token"] == ""
        for task in TASKS:
            assert 0.0 <= float(row[f"accuracy_{task}"]) <= 1.0
