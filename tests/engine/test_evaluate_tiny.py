"""The evaluation harness (benchmarks/evaluate.py) end to end through vLLM, on the tiny model.

The tiny model has random weights, so its accuracy is meaningless; what is checked is the
plumbing: held-out examples in, a table and its JSON/CSV out, and the same numbers again from a
second run with the same seed. Both runs share one engine (start-up is ~1 minute on 2 cores).
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import evaluate
from benchmarks.evaluate import CONFIGURATIONS, Model, Report, TaskResult

TASKS = ("arith", "recall", "text")
N = 3
MAX_TOKENS = {"arith": 24, "recall": 12, "text": 16}


@pytest.fixture(scope="module")
def two_runs(tiny_model: Path) -> tuple[Report, Report]:
    model = Model("tiny", str(tiny_model))
    with evaluate.open_engine(model, CONFIGURATIONS["baseline"]) as llm:

        @contextlib.contextmanager
        def shared_engine(*args, **kwargs) -> Iterator:
            yield llm

        return tuple(  # type: ignore[return-value]
            evaluate.run_evaluation([model], TASKS, n=N, seed=123, max_tokens=MAX_TOKENS, batch1=2,
                                    engine_factory=shared_engine)
            for _ in range(2)
        )


@pytest.mark.engine
def test_one_row_per_task_with_sane_values(two_runs: tuple[Report, Report]) -> None:
    report, _ = two_runs
    assert [(r.model, r.configuration, r.task) for r in report.results] == [
        ("tiny", "baseline", task) for task in TASKS
    ]
    for row in report.results:
        assert row.n == N and 0 <= row.correct <= N
        assert 0.0 <= row.accuracy <= 1.0 and row.accuracy == row.correct / N
        assert 0 < row.generated_tokens <= N * MAX_TOKENS[row.task]
        assert row.seconds > 0 and row.tokens_per_s > 0
        assert row.batch1_tokens_per_s > 0  # the first 2 examples, one request at a time
    recall_row = report.results[TASKS.index("recall")]
    assert recall_row.prompt_tokens > N * 1400  # the default ~1500-token prompts went in
    assert len(report.predictions) == N * len(TASKS)


@pytest.mark.engine
def test_same_seed_gives_the_same_outputs_and_scores(two_runs: tuple[Report, Report]) -> None:
    first, second = two_runs

    def scores(report: Report) -> list[tuple]:
        return [(r.task, r.correct, r.generated_tokens, r.prompt_tokens) for r in report.results]

    assert scores(first) == scores(second)
    assert first.predictions == second.predictions


@pytest.mark.engine
def test_report_files_hold_the_table(two_runs: tuple[Report, Report], tmp_path: Path) -> None:
    report, _ = two_runs
    evaluate.write_report(report, tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["meta"]["seed"] == 123 and payload["meta"]["tasks"] == list(TASKS)
    assert payload["meta"]["engine"]["kv_cache_memory_bytes"] == 1 << 30
    assert [TaskResult(**row) for row in payload["results"]] == report.results
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["task"], int(r["correct"]), float(r["accuracy"])) for r in rows] == [
        (r.task, r.correct, r.accuracy) for r in report.results
    ]
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == N * len(TASKS) and {p["task"] for p in predictions} == set(TASKS)
    table = evaluate.format_table(report.results).splitlines()
    assert table[0].startswith("| model | configuration | task | n | accuracy | tokens_per_s")
    assert len(table) == 2 + len(TASKS) and all("| tiny | baseline |" in line for line in table[2:])


# ---- command line (no engine) ------------------------------------------------------------------

def test_command_line_reads_models_tasks_and_limits(tiny_model: Path) -> None:
    args = evaluate.parse_args(["--models", f"small={tiny_model}", f"big={tiny_model}",
                                "--tasks", "arith,recall", "--n", "5", "--max-tokens", "arith=64"])
    assert [m.label for m in args.model_list] == ["small", "big"]
    assert args.task_list == ["arith", "recall"] and args.n == 5
    assert args.max_tokens == {"arith": 64}
    assert [c.name for c in args.configuration_list] == ["baseline"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "arith"], "at least one model"),
    (["--model", "tiny", "--tasks", "math"], "unknown ['math']; known tasks"),
    (["--model", "tiny", "--configurations", "turbo"], "unknown ['turbo']; known"),
    (["--model", "/nonexistent"], "not a model folder (no config.json); names: ['tiny'"),
    (["--model", "tiny", "--model", "tiny"], "labels must differ"),
    (["--model", "tiny", "--max-tokens", "many"], "expected N or TASK=N"),
])
def test_command_line_refuses_bad_arguments(argv: list[str], message: str, capsys, tiny_model: Path) -> None:
    with pytest.raises(SystemExit):
        evaluate.parse_args(argv)
    assert message in capsys.readouterr().err
