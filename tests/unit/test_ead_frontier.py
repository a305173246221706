"""benchmarks/ead_frontier.py without an engine: rows, checks, table and footer from hand-written
measurements (expected numbers worked out by hand), the random control's coin decoder on fake
models, and the command line. The script runs through real engines on the tiny pair in
tests/engine/test_ead_frontier_tiny.py."""

from __future__ import annotations

import pytest

from benchmarks.ead_frontier import (
    control_plan,
    coin_decode,
    draw_owners,
    engine_configs,
    format_footer,
    format_table,
    frontier_checks,
    parse_args,
    plot_frontier,
    summarise,
)

T, F = True, False
GENERATED = 40  # tokens per task and workload in every measurement below


def measurement(row: str, kind: str, task: str, repeat: int | None, *, workload: str = "all",
                correct: list[bool] | None = None, seconds: float = 1.0, large: int = 0, passes: int | None = 0,
                tau: float | None = None, k: int | None = None) -> dict:
    m = {"row": row, "kind": kind, "tau": tau, "k": k, "task": task, "workload": workload, "seconds": seconds,
         "generated": GENERATED, "large_tokens": large, "target_passes": passes}
    if correct is not None:
        m["correct"] = correct
    if repeat is not None:
        m["repeat"] = repeat
    return m


def engine(row: str, kind: str, repeat: int, arith: list[bool], text: list[bool], *, seconds: float = 1.0,
           large: tuple[int, int] = (0, 0), passes: tuple[int, int] = (0, 0), **kw) -> list[dict]:
    """A batch-of-all-prompts measurement on arith and on text, `seconds` each."""
    return [measurement(row, kind, task, repeat, correct=correct, seconds=seconds, large=n_large, passes=n_passes, **kw)
            for task, correct, n_large, n_passes in (("arith", arith, large[0], passes[0]),
                                                     ("text", text, large[1], passes[1]))]


def batch1(row: str, kind: str, repeat: int, seconds: float, **kw) -> list[dict]:
    return [measurement(row, kind, task, repeat, workload="batch1", seconds=seconds / 2, **kw)
            for task in ("arith", "text")]


ALL = (40, 40)
LARGE_ARITH = {0: [T, T, F, T], 1: [T, T, F, F]}  # 0.75 in repeat 0, 0.5 in repeat 1; first 2: 1.0


def measurements() -> list[dict]:
    ms = []
    for r in (0, 1):
        ms += engine("small", "small", r, [F, F, F, F], [T, T, T, F])
        ms += engine("large", "large", r, LARGE_ARITH[r], [T] * 4, seconds=2.0 if r == 0 else 4.0, large=ALL,
                     passes=ALL)
        ms += engine("fixed-2", "fixed", r, LARGE_ARITH[r], [T] * 4, seconds=1.0 if r == 0 else 2.0, large=ALL,
                     passes=(20, 16), k=2)
        ms += batch1("fixed-2", "fixed", r, 2.0 if r == 0 else 4.0, k=2)  # 40 then 20 tokens/s
        ms += engine("fixed-4", "fixed", r, LARGE_ARITH[r], [T] * 4, seconds=0.8 if r == 0 else 2.5, large=ALL,
                     passes=(12, 10), k=4)
        ms += engine("ead-faithful@0.1", "ead-faithful", r, [T, T, F, T], [T] * 4, large=(20, 30), passes=(20, 30),
                     tau=0.1)
        ms += engine("ead-faithful@0.5", "ead-faithful", r, [T, T, F, T], [T] * 4, large=(10, 20), passes=(12, 22),
                     tau=0.5)
        ms += engine("ead-faithful@1", "ead-faithful", r, [T, F, F, T], [T, T, T, F], large=(4, 8), passes=(4, 8),
                     tau=1.0)
        ms += engine("ead-speculative@0.5", "ead-speculative", r, [T, T, F, T], [T] * 4,
                     seconds=0.5 if r == 0 else 2.0, large=(10, 20), passes=(6, 10), tau=0.5)
        ms += batch1("ead-speculative@0.5", "ead-speculative", r, 4.0 if r == 0 else 2.0, tau=0.5)  # 20 then 40
    # the control mirrors ead-faithful@0.5, on the first 2 prompts, once
    ms += [measurement("random@0.25", "random", "arith", None, workload="control", correct=[F, T], large=9,
                       passes=None, tau=0.5),
           measurement("random@0.25", "random", "text", None, workload="control", correct=[T, T], large=21,
                       passes=None, tau=0.5)]
    return ms


@pytest.fixture
def rows():
    return {row.name: row for row in summarise(measurements(), control_prompts=2)}


def test_rows_come_in_a_fixed_order_small_large_fixed_k_ead_by_tau_random(rows) -> None:
    assert list(rows) == ["small", "large", "fixed-2", "fixed-4", "ead-faithful@0.1", "ead-faithful@0.5",
                          "ead-faithful@1", "ead-speculative@0.5", "random@0.25"]


def test_accuracy_is_the_share_correct_averaged_over_repeats_and_on_the_control_prompts(rows) -> None:
    assert rows["large"].accuracy == {"arith": pytest.approx(0.625), "text": 1.0}  # (0.75 + 0.5) / 2
    assert rows["large"].control_accuracy == {"arith": 1.0, "text": 1.0}  # first 2 prompts: T, T
    assert rows["small"].accuracy == {"arith": 0.0, "text": 0.75}
    assert rows["ead-faithful@1"].control_accuracy["arith"] == 0.5  # T, F
    assert rows["random@0.25"].accuracy == {"arith": 0.5, "text": 1.0}
    assert rows["random@0.25"].repeats == 1 and rows["large"].repeats == 2


def test_accuracy_over_large_is_taken_within_each_repeat(rows) -> None:
    # ead-faithful@1: 0.5 / 0.75 in repeat 0, 0.5 / 0.5 in repeat 1 (not 0.5 / 0.625 = 0.8)
    assert rows["ead-faithful@1"].relative_accuracy["arith"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert rows["ead-faithful@0.5"].relative_accuracy["arith"] == pytest.approx((1.0 + 1.5) / 2)
    assert rows["small"].relative_accuracy == {"arith": 0.0, "text": 0.75}
    # the control against large on the same (control) prompts: 0.5 / 1.0
    assert rows["random@0.25"].relative_accuracy["arith"] == 0.5


def test_large_fraction_and_target_passes_per_token(rows) -> None:
    assert rows["ead-faithful@0.5"].large_fraction == {"arith": 0.25, "text": 0.5}  # 10/40, 20/40
    assert rows["ead-faithful@0.5"].target_passes_per_token == pytest.approx(34 / 80)
    assert rows["fixed-2"].target_passes_per_token == pytest.approx(36 / 80)
    assert rows["large"].large_fraction == {"arith": 1.0, "text": 1.0}
    assert rows["large"].target_passes_per_token == 1.0
    assert rows["small"].large_fraction == {"arith": 0.0, "text": 0.0}
    assert rows["random@0.25"].large_fraction == {"arith": 9 / 40, "text": 21 / 40}
    assert rows["random@0.25"].target_passes_per_token is None


def test_tokens_per_s_is_per_repeat_over_all_tasks_then_averaged(rows) -> None:
    fixed = rows["fixed-2"]
    assert fixed.tokens_per_s_by_repeat["all"] == {0: 40.0, 1: 20.0}  # 80 tokens in 2 s, then in 4 s
    assert fixed.tokens_per_s["all"] == 30.0
    assert fixed.tokens_per_s_spread["all"] == pytest.approx(20 / 30)
    assert fixed.tokens_per_s["batch1"] == 30.0  # 80 tokens in 2 x 1 s, then in 2 x 2 s
    assert rows["fixed-4"].tokens_per_s["all"] == pytest.approx((50 + 16) / 2)
    assert rows["large"].tokens_per_s["batch1"] is None  # not measured
    assert rows["random@0.25"].tokens_per_s == {"all": None, "batch1": None}  # the control is not timed


def test_the_control_runs_at_each_faithful_fraction_strictly_between_0_and_1(rows) -> None:
    more = summarise(measurements() + engine("ead-faithful@9", "ead-faithful", 0, [F] * 4, [T] * 4, large=(0, 0),
                                             tau=9.0), control_prompts=2)
    plan = control_plan(more, ["arith", "text"])
    assert plan == [
        {"row": "random@0.5", "tau": 0.1, "fractions": {"arith": 0.5, "text": 0.75}},
        {"row": "random@0.25", "tau": 0.5, "fractions": {"arith": 0.25, "text": 0.5}},
        {"row": "random@0.1", "tau": 1.0, "fractions": {"arith": 0.1, "text": 0.2}},
    ]  # tau 9 wrote nothing with the large model (fraction 0): no control


def test_checks_pick_the_cheapest_qualifying_tau_its_margin_and_its_speed(rows) -> None:
    checks = frontier_checks(list(rows.values()))
    # needs arith accuracy >= 0.97 x 0.625: taus 0.1 (fraction 0.5 > 0.35) and 0.5 qualify on accuracy
    assert checks.tau == 0.5 and checks.large_fraction == 0.25 and checks.accuracy == 0.75
    assert checks.ead_control_accuracy == 1.0 and checks.control_accuracy == 0.5
    assert checks.margin_points == pytest.approx(50.0) and checks.margin_ok
    assert checks.best_fixed == {"all": "fixed-4", "batch1": "fixed-2"}  # 33 > 30 tokens/s; the only one
    assert checks.speed_ratios["all"] == {0: pytest.approx(80 / 50), 1: pytest.approx(20 / 16)}
    assert checks.speed_ratios["batch1"] == {0: 0.5, 1: 2.0}
    assert checks.beats_best_fixed("all") is True
    assert checks.beats_best_fixed("batch1") is False  # faster in one repeat of two


def test_footer_states_each_check_with_its_numbers(rows) -> None:
    footer = format_footer(frontier_checks(list(rows.values())), control_prompts=2)
    assert "large fraction <= 0.35: tau 0.5 (large fraction 0.250, accuracy 0.750)" in footer
    assert "1.000 vs 0.500 = +50.0 points (>= 10 required): yes" in footer
    assert "ead-speculative@0.5 vs best fixed K (fixed-2) in tokens/s, batch 1, per repeat: 0.50x, 2.00x; " \
           "faster in 1/2 repeats: no" in footer
    assert "(fixed-4) in tokens/s, all prompts at once, per repeat: 1.60x, 1.25x; faster in 2/2 repeats: yes" in footer


def test_no_qualifying_tau_is_answered_none(rows) -> None:
    cheap_but_wrong = [r for name, r in rows.items() if name not in ("ead-faithful@0.5", "ead-faithful@0.1")]
    checks = frontier_checks(cheap_but_wrong)
    assert checks.tau is None and checks.margin_points is None and checks.speed_ratios == {}
    assert "0.97 x large's (0.625) and large fraction <= 0.35: none" in format_footer(checks, 2)


def test_a_small_margin_over_the_control_fails() -> None:
    ms = [m for m in measurements() if m["row"] != "random@0.25"]
    ms += [measurement("random@0.25", "random", "arith", None, workload="control", correct=[T, T], large=10,
                       passes=None, tau=0.5)]
    checks = frontier_checks(summarise(ms, control_prompts=2))
    assert checks.margin_points == 0.0 and checks.margin_ok is False
    assert "= +0.0 points (>= 10 required): no" in format_footer(checks, 2)


def test_table_has_one_line_per_row_with_its_cells(rows) -> None:
    lines = format_table(list(rows.values()), ["arith", "text"], n=4, control_prompts=2).splitlines()
    assert lines[0] == ("| configuration | tau | arith acc | text acc | arith acc (first 2) | arith vs large | "
                        "large fraction arith | large fraction text | target passes/token | tokens/s (batch 4) | "
                        "tokens/s (batch 1) |")
    assert len(lines) == 2 + len(rows)
    by_name = {line.split(" | ")[0].removeprefix("| "): line for line in lines[2:]}
    assert by_name["ead-faithful@0.5"] == ("| ead-faithful@0.5 | 0.5 | 0.750 | 1.000 | 1.000 | 1.25x | 0.250 | "
                                           "0.500 | 0.425 | 40.0 |  |")
    assert by_name["fixed-2"] == ("| fixed-2 |  | 0.625 | 1.000 | 1.000 | 1.00x | 1.000 | 1.000 | 0.450 | "
                                  "30.0 ±67% | 30.0 ±67% |")
    assert by_name["large"].split(" | ")[5] == ""  # no ratio of large to itself
    assert by_name["random@0.25"] == "| random@0.25 | 0.5 | 0.500 | 1.000 | 0.500 | 0.50x | 0.225 | 0.525 |  |  |  |"


def test_plot_is_written(rows, tmp_path) -> None:
    plot_frontier(list(rows.values()), "arith", tmp_path / "frontier.png", control_prompts=2)
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the random control's decoder ---------------------------------------------------------------


def fake_models(stop_after: dict[int, int] | None = None):
    """Small writes 1, large writes 2; prompt i stops (a stop token) once it has stop_after[i]
    tokens. Records each call as (large, lengths)."""
    calls = []

    def generate(large: bool, prefixes: list[list[int]], lengths: list[int]):
        calls.append((large, lengths))
        results = []
        for prefix, n in zip(prefixes, lengths):
            index, written = prefix[0], len(prefix) - 1
            limit = (stop_after or {}).get(index, 10**9) - written
            tokens = [2 if large else 1] * min(n, limit)
            results.append((tokens, n >= limit))
        return results

    return generate, calls


def test_coin_decoder_writes_each_position_with_its_owner_one_run_per_call() -> None:
    generate, calls = fake_models()
    owners = [[F, F, T, F, T, T], [T, T, T, T, T, T]]
    decoded = coin_decode([[0], [1]], owners, generate)
    assert decoded == [([1, 1, 2, 1, 2, 2], 3), ([2] * 6, 6)]
    # round 1: small runs (prompt 0: 2), then large runs (prompt 0: 1; prompt 1: all 6); round 2: ...
    assert calls == [(False, [2]), (True, [1, 6]), (False, [1]), (True, [2])]


def test_coin_decoder_stops_a_prompt_at_a_stop_token() -> None:
    generate, _ = fake_models(stop_after={0: 3})
    decoded = coin_decode([[0], [1]], [[F, T, F, F, T], [F] * 5], generate)
    assert decoded == [([1, 2, 1], 1), ([1] * 5, 0)]


def test_owners_are_seeded_and_follow_the_fraction() -> None:
    assert draw_owners(0.3, 50, "s") == draw_owners(0.3, 50, "s") != draw_owners(0.3, 50, "t")
    assert not any(draw_owners(0.0, 20, "s")) and all(draw_owners(1.0, 20, "s"))
    assert 2500 < sum(draw_owners(0.3, 10000, "s")) < 3500


# ---- configurations and the command line -----------------------------------------------------------


def test_engines_are_small_large_each_fixed_k_and_one_routed_engine_per_mode() -> None:
    configs = engine_configs([2, 4], ead_k=4)
    assert [(c.name, c.kind, c.k, c.mode) for c in configs] == [
        ("small", "small", 0, None), ("large", "large", 0, None), ("fixed-2", "fixed", 2, None),
        ("fixed-4", "fixed", 4, None), ("ead-faithful", "ead", 4, "faithful"),
        ("ead-speculative", "ead", 4, "speculative")]


def test_defaults_match_the_issue() -> None:
    args = parse_args([])
    assert args.task_list == ["arith", "text"] and args.n == 100 and args.ks == [2, 4, 6]
    assert args.taus == [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    assert args.control_prompts == 30 and args.ead_window == 5 and args.ead_min_stint == 0
    assert args.max_tokens == {"arith": 128, "text": 64}
    assert parse_args(["--max-tokens", "arith=16"]).max_tokens == {"arith": 16, "text": 64}


@pytest.mark.parametrize(("argv", "message"), [
    (["--tasks", "poetry"], "--tasks: unknown ['poetry']"),
    (["--ks", "0,2"], "--ks: give at least one K, each >= 1"),
    (["--ks", "two"], "expected integers like 2,4,6"),
    (["--taus", "0,1"], "--taus: give at least one tau, each in (0, inf) bits"),
    (["--n", "10", "--control-prompts", "30"], "--control-prompts must be in [0, --n=10], got 30"),
    (["--max-tokens", "poetry=3"], "--max-tokens: unknown tasks ['poetry']"),
    (["--max-tokens", "arith"], "expected TASK=N"),
])
def test_bad_arguments_are_refused(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_coin_decoder_ends_a_prompt_that_gets_fewer_tokens_than_asked() -> None:
    def generate(large: bool, prefixes: list[list[int]], lengths: list[int]):
        return [([7], False) for _ in prefixes]  # one token whatever was asked: a length limit

    assert coin_decode([[0]], [[F, F, F, T]], generate) == [([7], 0)]
