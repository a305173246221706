"""benchmarks/speculative.py: the table's figures from engine runs (synthetic runs, no engine).

The same script runs on the tiny models through real engines in tests/engine/test_speculative_benchmark.py
(module names differ: pytest imports test modules by basename).
"""

from __future__ import annotations

import pytest

from benchmarks.speculative import Config, configurations, format_table, parse_args, summarise


def workload(task: str, batch: int, seconds: float, generated: int, steps: int, draft_passes: float = 0.0,
             drafts: int = 0, accepted: int = 0, tokens: list[list[int]] | None = None) -> dict:
    return {"task": task, "batch": batch, "seconds": seconds, "generated": generated, "steps": steps,
            "draft_passes": draft_passes, "drafts": drafts, "draft_tokens": 0, "accepted_tokens": accepted,
            "generation_tokens": generated, "tokens": tokens or [[1, 2], [3, 4]]}


def run(repeat: int, config: str, *workloads: dict) -> dict:
    return {"repeat": repeat, "config": config, "startup_seconds": 1.0, "workloads": list(workloads)}


def test_ratios_are_taken_within_a_repeat_then_averaged_and_the_model_uses_passes() -> None:
    runs = [
        run(0, "none", workload("arith", 1, 10.0, 100, 100)),
        run(0, "k2", workload("arith", 1, 5.0, 100, 40, draft_passes=80, drafts=38, accepted=60)),
        run(1, "k2", workload("arith", 1, 8.0, 100, 40, draft_passes=80, drafts=38, accepted=60)),
        run(1, "none", workload("arith", 1, 20.0, 100, 100)),  # a slow repeat: both slow
        run(0, "adaptive", workload("arith", 1, 4.0, 100, 30, draft_passes=60, drafts=29, accepted=70,
                                    tokens=[[1, 2], [3, 5]])),
        run(1, "adaptive", workload("arith", 1, 8.0, 100, 30, draft_passes=60, drafts=29, accepted=70,
                                    tokens=[[1, 2], [3, 5]])),
    ]
    rows = {r.config: r for r in summarise(runs, cost_ratio=0.05)}
    k2, adaptive = rows["k2"], rows["adaptive"]
    assert k2.speedup == pytest.approx((2.0 + 2.5) / 2)  # 20/10 and 12.5/5, per repeat
    assert k2.tokens_per_s == pytest.approx((20.0 + 12.5) / 2)
    assert k2.accepted_length == pytest.approx(1 + 120 / 76)
    assert k2.target_passes_per_token == pytest.approx(0.4)
    assert k2.draft_passes_per_token == pytest.approx(0.8)
    # none: 1 pass per token; k2: (0.4 + 0.05 * 0.8) per token
    assert k2.modelled_speedup == pytest.approx(1.0 / (0.4 + 0.05 * 0.8))
    assert k2.identical == 1.0 and k2.repeats == 2
    assert adaptive.identical == 0.5  # one of two prompts differs from none's, in both repeats
    assert rows["none"].speedup == 1.0 and rows["none"].modelled_speedup == pytest.approx(1.0)
    table = format_table(list(rows.values()))
    # adaptive against the best fixed K (here k2 alone): tokens/s and modelled
    expected = f"{adaptive.speedup / k2.speedup:.2f}x ({adaptive.modelled_speedup / k2.modelled_speedup:.2f}x modelled)"
    assert expected in table


def test_batch_rows_have_no_modelled_speedup() -> None:
    runs = [run(0, "none", workload("text", 32, 1.0, 320, 20)),
            run(0, "k1", workload("text", 32, 1.0, 320, 12, draft_passes=12, drafts=300, accepted=100))]
    rows = summarise(runs, cost_ratio=0.05)
    assert all(r.modelled_speedup is None for r in rows)


def test_configurations_cover_none_fixed_k_ngram_and_both_adaptive_runs() -> None:
    configs = configurations("/draft", range(1, 9), ngram_k=4, adaptive_k=8)
    names = [c.name for c in configs]
    assert names == ["none", *(f"k{k}" for k in range(1, 9)), "ngram", "adaptive", "adaptive@gpu"]
    by_name = {c.name: c for c in configs}
    assert by_name["k3"].fixed_k == 3 and by_name["adaptive"].fixed_k == 0 and by_name["ngram"].fixed_k == 0
    assert by_name["adaptive"].adaptive == {"speculative": {"enabled": True, "max_draft_tokens": 8}}
    gpu = by_name["adaptive@gpu"].adaptive["speculative"]
    assert gpu["draft_cost_ratio"] == 0.05 and gpu["controller"] is False
    assert by_name["adaptive"].speculative == {"method": "draft_model", "model": "/draft", "num_speculative_tokens": 8}
    assert Config("none").fixed_k == 0


@pytest.mark.parametrize(("argv", "message"), [
    (["--ks", "0-3"], "every K must be >= 1"),
    (["--ks", "a"], "--ks: expected a range"),
    (["--tasks", "poetry"], "--tasks: unknown ['poetry']"),
    (["--cost-ratio", "1.5"], "--cost-ratio must be in [0, 1)"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_workloads_per_batch_size_and_a_mixed_batch() -> None:
    from transformers import AutoTokenizer

    from benchmarks.models import shipped
    from benchmarks.speculative import build_workloads
    from benchmarks.tasks.mixture import eval_examples

    folder = str(shipped.verified("target"))
    workloads = build_workloads(folder, ["arith"], 2, [3, 5], seed=7, mixed=7)
    assert [(w["task"], w["batch"], len(w["prompts"])) for w in workloads] == [
        ("arith", 1, 2), ("arith", 3, 3), ("arith", 5, 5), ("mixed", 7, 7)]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    arith = [tokenizer.encode(e.prompt) for e in eval_examples("arith", 7, 5)]
    assert workloads[2]["prompts"] == arith and workloads[2]["max_tokens"] == 128
    mixed = workloads[3]
    assert mixed["max_tokens"] == [128, 64, 8, 128, 64, 8, 128]
    text, recall = (eval_examples(t, 7, 3) for t in ("text", "recall"))
    expected = [arith[0], text[0].prompt, recall[0].prompt, arith[1], text[1].prompt, recall[1].prompt, arith[2]]
    assert mixed["prompts"] == [e if isinstance(e, list) else tokenizer.encode(e) for e in expected]


def test_batch_sizes_parse_as_a_list() -> None:
    assert parse_args(["--batch-sizes", "32,64"]).batch_size_list == [32, 64]
    assert parse_args(["--batch-size", "16"]).batch_size_list == [16]
    assert parse_args([]).batch_size_list == [32] and parse_args([]).mixed == 0
