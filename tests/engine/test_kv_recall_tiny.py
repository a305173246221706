"""The KV compaction recall-vs-budget benchmark (benchmarks/kv_recall.py) end to end on the tiny model.

The tiny model has random weights, so its accuracy means nothing; what is checked is the
plumbing: every (protocol, policy, budget) cell is there, scored on the held-out examples, the
full cache evicts nothing, compacted cells evict what their budget says and free blocks, the
scored policy (snapkv) is scored and not degraded, the key-after protocol writes the forced key
first, and the files hold the table. One engine (start-up is ~1 minute on 2 cores), 3 prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import kv_recall
from benchmarks.kv_recall import Budget, Cell, Report

N = 3
POLICIES = ("streaming", "snapkv")
BUDGETS = ("1/4", "1/16")


@pytest.fixture(scope="module")
def report(tiny_model: Path) -> Report:
    return kv_recall.run_benchmark(str(tiny_model), n=N, policies=POLICIES,
                                   budgets=[Budget.parse(b) for b in BUDGETS], kv_cache_bytes=256 << 20,
                                   dtype="float32")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.engine
def test_every_cell_is_scored_and_counts_its_evictions(report: Report) -> None:
    assert [(c.protocol, c.policy, c.budget) for c in report.cells] == [
        (protocol, policy, budget) for protocol in kv_recall.PROTOCOLS
        for policy, budget in [("-", "full"), *((p, b) for p in POLICIES for b in BUDGETS)]
    ]
    lengths = report.meta["prompt_tokens"]
    assert lengths["min"] > 1400  # the harness's default recall prompts went in
    block = report.meta["engine"]["block_size"]
    sinks = report.meta["kvcache"]["sinks"]
    for cell in report.cells:
        assert cell.n == N and 0 <= cell.correct <= N and cell.accuracy == cell.correct / N
        assert len(cell.answers) == N and 0.0 <= cell.same_as_full <= 1.0 and cell.seconds > 0
        assert cell.refused == 0 and cell.degraded == 0 and cell.preemptions >= 0
        if cell.budget == "full":
            assert cell.kv_budget is None and cell.same_as_full == 1.0
            assert (cell.compactions, cell.tokens_held, cell.tokens_evicted, cell.blocks_freed,
                    cell.scored) == (0, 0, 0, 0, 0)
            continue
        # Each prompt compacted once, after its prompt (key-after prompts lack their last token),
        # to ceil(share x its length) tokens; the blocks past the kept ones went back to the pool.
        short = 1 if cell.protocol == "key-after" else 0
        low, high = lengths["min"] - short, lengths["max"] - short
        share = float(cell.kv_budget)  # type: ignore[arg-type]
        assert cell.compactions == N
        assert cell.tokens_held == round(lengths["mean"] * N) - short * N
        assert N * math.ceil(share * low) <= cell.tokens_kept <= N * math.ceil(share * high)
        assert cell.tokens_evicted == cell.tokens_held - cell.tokens_kept > 0
        freed = [cdiv(p, block) - cdiv(math.ceil(share * p), block) for p in (low, high)]
        assert N * min(freed) <= cell.blocks_freed <= N * max(freed) and cell.blocks_freed > 0
        # The workers ran the policy's own selection (snapkv from its scores, none degraded).
        assert cell.scored == (N if cell.policy == "snapkv" else 0)
        if cell.policy == "streaming":
            assert cell.pair_kept is not None and 0.0 <= cell.pair_kept <= 1.0
        else:
            assert cell.pair_kept is None
        assert sinks == 4


@pytest.mark.engine
def test_streaming_keeps_fewer_queried_pairs_at_smaller_budgets(report: Report) -> None:
    for protocol in kv_recall.PROTOCOLS:
        kept = [c.pair_kept for c in report.cells if c.protocol == protocol and c.policy == "streaming"]
        assert kept == sorted(kept, reverse=True)  # 1/4 before 1/16: the kept windows are nested


@pytest.mark.engine
def test_report_files_hold_the_table(report: Report, tmp_path: Path) -> None:
    kv_recall.write_report(report, tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [Cell(**c) for c in payload["cells"]] == report.cells
    assert payload["meta"]["n"] == N and payload["meta"]["policies"] == list(POLICIES)
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| protocol | policy | budget | kept / request | accuracy")
    assert len(table) == 2 + len(report.cells)
    assert kv_recall.plot(report.cells, tmp_path / "accuracy.png") is False or (tmp_path / "accuracy.png").stat().st_size > 0


# ---- pieces without an engine ---------------------------------------------------------------------

def test_budgets_parse_as_shares_tokens_or_full() -> None:
    assert Budget.parse("full") == Budget("full", None)
    assert Budget.parse("1/8") == Budget("1/8", 0.125)
    assert Budget.parse("0.5").value == 0.5 and Budget.parse("200").value == 200
    assert Budget.parse("entropy") == Budget("entropy", "entropy")
    assert Budget.parse("entropy:0.25") == Budget("entropy:0.25", "entropy", 0.25)
    for bad in ("0", "3/2", "1.5", "-1/4", "half", "entropy:0", "entropy:x"):
        with pytest.raises(ValueError, match="budget"):
            Budget.parse(bad)


def test_streaming_window_holds_the_pair_only_inside_sinks_or_recent() -> None:
    # 100 tokens, budget 20, 4 sinks: kept 0..3 and 84..99.
    assert kv_recall.streaming_keeps_pair(1, 100, 20, 4)
    assert not kv_recall.streaming_keeps_pair(3, 100, 20, 4)  # its value (4) is evicted
    assert not kv_recall.streaming_keeps_pair(83, 100, 20, 4)
    assert kv_recall.streaming_keeps_pair(84, 100, 20, 4)
    assert kv_recall.streaming_keeps_pair(50, 100, 100, 4)
    assert kv_recall.queried_pair_index([1, 7, 9, 5, 8, 7]) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["--policies", "nope"], "--policies: unknown ['nope']"),
    (["--budgets", "full,2/1x"], "budget '2/1x'"),
    (["--protocols", "later"], "--protocols: unknown ['later']"),
    (["--model", "/nonexistent"], "not a model folder"),
])
def test_command_line_refuses_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        kv_recall.parse_args(argv)
    assert message in capsys.readouterr().err
