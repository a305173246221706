"""The quality/cost frontier of Entropy Adaptive Decoding (EAD, arXiv 2502.06833) on a model pair.

    python -m benchmarks.ead_frontier          # the trained pair, arith and text, 100 prompts each

EAD lets the small (draft) model write while the rolling mean of its entropy is at most tau bits
and the large (target) model otherwise (vllm_adaptive.routing.policy). Sweeping tau traces
accuracy against the share of tokens the large model writes; this script measures that curve
beside the points every EAD row should be judged against. Rows (one engine each unless said):

- `small`: the draft alone; `large`: the target alone (plain vLLM, no speculation);
- `fixed-K` for each K in --ks: vLLM's lossless draft-model speculation, the speed baselines;
- `ead-faithful@tau`, `ead-speculative@tau` for each tau in --taus: one routed engine per mode
  (`routing.enabled`, K = --ead-k) serves every tau, since tau is a per-request key;
- `random@p`: the control. For each faithful tau whose large fraction (on the first task, arith
  by default) lies in (0, 1), a "coin" decoder writes each position with the large model with
  probability p = that row's large fraction per task, with the small model otherwise, greedy,
  on the first --control-prompts prompts. Random routing is not in the plugin, so the coin runs
  on two plain engines (small and large) in one process with prefix caching on: owners are
  drawn per position up front (seeded), so each run of positions one model owns is one greedy
  `generate` of that length from the prompt plus everything written so far, which is the same
  as generating it one token at a time. A stop token ends the request, as in the engines.

Every engine runs in its own process, in the same environment (the plugin installed), as
benchmarks/speculative.py runs them; the engine list runs --repeats times, shuffled differently
each time, and every ratio is taken within a repeat, then averaged. The control runs once, after
the repeats (it needs the faithful rows' fractions; its figures are not timed). Per task, every
engine (and every tau) generates the --n held-out prompts (benchmarks.tasks.mixture.eval_examples)
greedily in one `generate` call (batch of all prompts), then the first --batch1-prompts one at a
time (prefix cache reset before each).

Columns: accuracy per task (benchmarks.evaluate's scoring: `is_correct` on the generated text),
the same on the first --control-prompts prompts (what the control is compared on), accuracy
over `large`'s (same repeat), large fraction per task (tokens the large model wrote / generated:
the routing counters for EAD; 0 for small, 1 for large and fixed K), target passes per generated
token (sequential large-model passes of a request: the routing counters' target_passes for EAD,
vLLM's drafts + the prefill step per request for fixed K, one per token for large), and tokens/s
(generated tokens / wall time of the generate calls, all tasks together; batch of all prompts
and batch 1, with the spread over repeats). The footer answers issue #16's checks: the
smallest-large-fraction faithful tau with accuracy >= 0.97 x large's and large fraction <= 0.35,
its margin over the random control (>= 10 points), and whether ead-speculative at that tau
beats the best fixed K in tokens/s in every repeat.

Writes results.json, results.csv, table.md, frontier.png and runs.json (every engine's outputs)
to --out (default results/ead-frontier/<date-time>/), and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.speculative import DEFAULT_ENGINE_ARGS, ENGINE_SEED, MAX_TOKENS
from benchmarks.tasks.mixture import EVAL_SEED, eval_examples, task_module

DEFAULT_TASKS = ("arith", "text")
DEFAULT_KS = (2, 4, 6)
DEFAULT_TAUS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
DEFAULT_EAD_K = 4  # vllm_adaptive.routing.compatibility.DEFAULT_DRAFT_TOKENS
KV_CACHE_BYTES = 1 << 30  # per engine; on CPU vLLM's default would reserve 92% of host RAM
MAX_MODEL_LEN = 2048
CONTROL_SEED = 0
# The checks.
ACCURACY_SHARE = 0.97  # of large's accuracy
MAX_LARGE_FRACTION = 0.35
MIN_MARGIN_POINTS = 10.0  # over the random control at the same fraction, accuracy points
KIND_ORDER = ("small", "large", "fixed", "ead-faithful", "ead-speculative", "random")
WORKLOADS = ("all", "batch1")  # timed: the batch of all prompts, one at a time


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """One engine: which model it serves, and how it speculates or routes."""

    name: str  # small, large, fixed-K, ead-faithful, ead-speculative
    kind: str  # small, large, fixed, ead
    k: int = 0  # draft length: fixed K's, or the routed engine's
    mode: str | None = None  # routed engines: the EAD mode of their requests

    def __post_init__(self) -> None:
        if self.kind not in ("small", "large", "fixed", "ead"):
            raise ValueError(f"engine kind must be small, large, fixed or ead, got {self.kind!r}")
        if self.kind in ("fixed", "ead") and self.k < 1:
            raise ValueError(f"{self.name}: a speculating engine needs K >= 1, got {self.k}")


def engine_configs(ks: Sequence[int], ead_k: int) -> list[EngineConfig]:
    return [EngineConfig("small", "small"), EngineConfig("large", "large"),
            *(EngineConfig(f"fixed-{k}", "fixed", k) for k in ks),
            *(EngineConfig(f"ead-{mode}", "ead", ead_k, mode) for mode in ("faithful", "speculative"))]


def ead_row(mode: str, tau: float) -> str:
    return f"ead-{mode}@{tau:g}"


# --- one engine, in its own process --------------------------------------------------------------


def _spec_drafts(llm: Any) -> float:
    """vLLM's count of (request, step) drafts so far."""
    return sum(float(m.value) for m in llm.get_metrics()
               if m.name.removesuffix("_total") == "vllm:spec_decode_num_drafts")


def _routing_counters(llm: Any) -> dict[str, int]:
    from vllm_adaptive.introspection import adaptive_worker_state

    [state] = llm.collective_rpc(adaptive_worker_state)
    return {k: v for k, v in state["routing"]["counters"].items() if isinstance(v, int)}


def _engine_arguments(spec: Mapping[str, Any], model: str) -> dict[str, Any]:
    from benchmarks.evaluate import model_max_len

    return {"kv_cache_memory_bytes": spec["kv_cache_bytes"], "max_model_len": model_max_len(model, MAX_MODEL_LEN),
            "seed": ENGINE_SEED, "disable_log_stats": False, **spec["engine_args"]}


def run_engine(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Start the engine of `spec["config"]`, run every variant (tau) on every workload, and
    return one measurement per (row, task, workload), with the texts of the batch of all prompts."""
    from vllm import LLM, SamplingParams

    config = EngineConfig(**spec["config"])
    model = spec["draft"] if config.kind == "small" else spec["target"]
    engine = _engine_arguments(spec, model)
    speculative = {"method": "draft_model", "model": spec["draft"], "num_speculative_tokens": config.k}
    if config.kind == "ead":
        import vllm_adaptive

        routing = {"enabled": True, "mode": config.mode, "large_draft_tokens": spec.get("large_draft_tokens"),
                   "min_drafting_fraction": spec.get("min_drafting_fraction", 0.0)}
        kwargs = vllm_adaptive.engine_kwargs({"routing": routing},
                                             speculative_config=speculative, **engine)
    else:
        kwargs = {**engine, **({"speculative_config": speculative} if config.kind == "fixed" else {})}
    started = time.perf_counter()
    llm = LLM(model, **kwargs)
    startup = time.perf_counter() - started
    if config.kind == "ead":
        variants = [(ead_row(config.mode, tau), tau, {"ead": True, "ead_tau": tau, "ead_mode": config.mode,
                                                       **spec["ead_keys"]}) for tau in spec["taus"]]
    else:
        variants = [(config.name, None, None)]
    measurements = []
    try:
        first = {"prompt_token_ids": spec["workloads"][0]["prompts"][0]}
        for extra in [None, *([variants[0][2]] if variants[0][2] else [])]:
            # one-off costs (EAD's first routed request's too) stay out of the timed calls
            llm.generate([first], SamplingParams(temperature=0.0, max_tokens=8, extra_args=extra), use_tqdm=False)
        for row, tau, extra in variants:
            for workload in spec["workloads"]:
                params = SamplingParams(temperature=0.0, max_tokens=workload["max_tokens"], extra_args=extra)
                prompts = [{"prompt_token_ids": ids} for ids in workload["prompts"]]
                for name, batch in (("all", prompts), ("batch1", prompts[: workload["batch1"]])):
                    if not batch:
                        continue
                    measured = _measure(llm, config, batch, params, one_at_a_time=name == "batch1")
                    if name == "batch1":
                        measured.pop("texts")  # scored on the batch of all prompts only
                    kind = config.name if config.kind == "ead" else config.kind
                    measurements.append({"row": row, "kind": kind, "tau": tau, "k": config.k or None,
                                         "task": workload["task"], "workload": name, **measured})
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"config": config.name, "startup_seconds": startup, "seconds": time.perf_counter() - started,
            "measurements": measurements}


def _measure(llm: Any, config: EngineConfig, prompts: list[dict[str, Any]], params: Any,
             one_at_a_time: bool) -> dict[str, Any]:
    llm.reset_prefix_cache()
    routing_before = _routing_counters(llm) if config.kind == "ead" else {}
    drafts_before = _spec_drafts(llm) if config.kind == "fixed" else 0.0
    seconds, outputs = 0.0, []
    for batch in ([[p] for p in prompts] if one_at_a_time else [prompts]):
        if one_at_a_time:
            llm.reset_prefix_cache()  # each request pays its own prefill
        start = time.perf_counter()
        outputs += llm.generate(batch, params, use_tqdm=False)
        seconds += time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    extra = {}
    if config.kind == "ead":
        after = _routing_counters(llm)
        large = after["large_tokens"] - routing_before["large_tokens"]
        passes = after["target_passes"] - routing_before["target_passes"]
        extra = {"routing_failures": after["failures"] - routing_before["failures"],
                 "draft_passes": after["draft_passes"] - routing_before["draft_passes"]}
    elif config.kind == "fixed":  # every step of a request but its prefill verifies a draft
        large, passes = generated, round(_spec_drafts(llm) - drafts_before) + len(prompts)
    elif config.kind == "large":
        large, passes = generated, generated
    else:
        large, passes = 0, 0
    return {"prompts": len(prompts), "seconds": seconds, "generated": generated, "large_tokens": large,
            "target_passes": passes, **extra, "texts": [o.outputs[0].text for o in outputs]}


# --- the random-routing control: two plain engines, a coin per position ---------------------------


def draw_owners(fraction: float, length: int, seed: str) -> list[bool]:
    """Which model writes each of `length` positions: True (large) with probability `fraction`."""
    rng = random.Random(seed)
    return [rng.random() < fraction for _ in range(length)]


# generate(large, prefixes, lengths) -> per prefix: (greedy tokens, stopped at a stop token)
Generate = Callable[[bool, list[list[int]], list[int]], list[tuple[list[int], bool]]]


def coin_decode(prompts: Sequence[list[int]], owners: Sequence[Sequence[bool]],
                generate: Generate) -> list[tuple[list[int], int]]:
    """Greedy decoding where `owners[i][j]` says which model writes position j of prompt i.

    Each round, every unfinished prompt advances by its next run of same-owner positions (all
    small runs in one batch, then all large ones): greedy, so a run of n positions is one
    generation of n tokens. A prompt ends at a stop token, or when a model returns fewer tokens
    than asked (its length limit). Returns per prompt (tokens, how many the large model wrote)."""
    generated: list[list[int]] = [[] for _ in prompts]
    large = [0] * len(prompts)
    active = [i for i in range(len(prompts)) if owners[i]]
    while active:
        for model_is_large in (False, True):
            batch = [i for i in active if owners[i][len(generated[i])] == model_is_large]
            if not batch:
                continue
            lengths = []
            for i in batch:
                start = end = len(generated[i])
                while end < len(owners[i]) and owners[i][end] == model_is_large:
                    end += 1
                lengths.append(end - start)
            results = generate(model_is_large, [list(prompts[i]) + generated[i] for i in batch], lengths)
            for i, n, (tokens, stopped) in zip(batch, lengths, results):
                generated[i] += tokens
                large[i] += len(tokens) if model_is_large else 0
                if stopped or len(tokens) < n or len(generated[i]) >= len(owners[i]):
                    active.remove(i)
    return [(tokens, n) for tokens, n in zip(generated, large)]


def run_control(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The coin decoder on the small and the large engine for every planned (tau, task)."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    engines = {}
    try:
        for is_large, model in ((False, spec["draft"]), (True, spec["target"])):
            engines[is_large] = LLM(model, **{**_engine_arguments(spec, model), "enable_prefix_caching": True})
        startup = time.perf_counter() - started
        tokenizer = engines[True].get_tokenizer()

        def generate(is_large: bool, prefixes: list[list[int]], lengths: list[int]) -> list[tuple[list[int], bool]]:
            params = [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
            outputs = engines[is_large].generate([{"prompt_token_ids": p} for p in prefixes], params, use_tqdm=False)
            return [(list(o.outputs[0].token_ids), o.outputs[0].finish_reason == "stop") for o in outputs]

        measurements = []
        for plan in spec["plan"]:
            for workload in spec["workloads"]:
                task, fraction = workload["task"], plan["fractions"][workload["task"]]
                prompts = workload["prompts"][: spec["control_prompts"]]
                owners = [draw_owners(fraction, workload["max_tokens"], f"{spec['seed']}/{task}/{plan['tau']}/{i}")
                          for i in range(len(prompts))]
                start = time.perf_counter()
                decoded = coin_decode(prompts, owners, generate)
                measurements.append({
                    "row": plan["row"], "kind": "random", "tau": plan["tau"], "k": None, "task": task,
                    "workload": "control", "fraction": fraction, "prompts": len(prompts),
                    "seconds": time.perf_counter() - start, "generated": sum(len(t) for t, _ in decoded),
                    "large_tokens": sum(n for _, n in decoded), "target_passes": None,
                    "texts": [tokenizer.decode(t, skip_special_tokens=True) for t, _ in decoded]})
    finally:
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()
    return {"config": "random", "startup_seconds": startup, "seconds": time.perf_counter() - started,
            "measurements": measurements}


def control_plan(rows: Sequence[Row], tasks: Sequence[str]) -> list[dict[str, Any]]:
    """The random rows to run: one per faithful row whose large fraction on tasks[0] is in (0, 1),
    at that row's fraction on each task."""
    plan = []
    for row in rows:
        fraction = row.large_fraction.get(tasks[0])
        if row.kind == "ead-faithful" and fraction is not None and 0 < fraction < 1:
            plan.append({"row": f"random@{fraction:.3g}", "tau": row.tau,
                         "fractions": {t: row.large_fraction[t] for t in tasks}})
    return plan


# --- figures from the measurements ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    """One table row: a configuration's figures, per task where they differ by task."""

    name: str
    kind: str  # one of KIND_ORDER
    tau: float | None  # EAD rows; random rows: the faithful row they mirror
    k: int | None
    accuracy: dict[str, float]  # all prompts (random: its control prompts), mean over repeats
    control_accuracy: dict[str, float]  # the first control_prompts prompts
    relative_accuracy: dict[str, float | None]  # over large's, same repeat (random: same prompts)
    large_fraction: dict[str, float]
    target_passes_per_token: float | None  # all tasks, batch of all prompts
    tokens_per_s: dict[str, float | None]  # workload -> mean over repeats of tokens/s, all tasks
    tokens_per_s_spread: dict[str, float | None]  # workload -> (max - min) / mean
    tokens_per_s_by_repeat: dict[str, dict[int, float]]  # workload -> repeat -> tokens/s
    repeats: int


def _sort_key(row: Row) -> tuple[int, float]:
    return KIND_ORDER.index(row.kind), row.tau if row.tau is not None else (row.k or 0)


def summarise(measurements: Sequence[Mapping[str, Any]], control_prompts: int) -> list[Row]:
    """Rows from scored measurements (each with `repeat` and `correct`, one bool per prompt)."""
    by_row: dict[str, list[Mapping[str, Any]]] = {}
    for m in measurements:
        by_row.setdefault(m["row"], []).append(m)

    def accuracies(ms: Sequence[Mapping[str, Any]], first: int | None = None) -> dict[tuple[str, int], float]:
        out = {}
        for m in ms:
            if m["workload"] in ("all", "control"):
                correct = m["correct"][:first] if first else m["correct"]
                out[(m["task"], m.get("repeat", 0))] = sum(correct) / len(correct)
        return out

    large = by_row.get("large", [])
    large_all, large_first = accuracies(large), accuracies(large, control_prompts)
    rows = []
    for name, ms in by_row.items():
        quality = [m for m in ms if m["workload"] in ("all", "control")]
        tasks = list(dict.fromkeys(m["task"] for m in quality))
        per_repeat, first = accuracies(ms), accuracies(ms, control_prompts)
        control = ms[0]["kind"] == "random"
        reference = large_first if control else large_all
        accuracy, control_accuracy, relative, fraction = {}, {}, {}, {}
        for task in tasks:
            accuracy[task] = statistics.fmean(v for (t, _), v in per_repeat.items() if t == task)
            control_accuracy[task] = statistics.fmean(v for (t, _), v in first.items() if t == task)
            if control:  # one run, on the first control_prompts prompts: compare with large's there
                base = statistics.fmean(v for (t, _), v in large_first.items() if t == task) if large_first else 0.0
                relative[task] = accuracy[task] / base if base else None
            else:
                ratios = [v / reference[key] for key, v in per_repeat.items() if key[0] == task and reference.get(key)]
                relative[task] = statistics.fmean(ratios) if ratios else None
            done = [m for m in quality if m["task"] == task]
            generated = sum(m["generated"] for m in done)
            fraction[task] = sum(m["large_tokens"] for m in done) / generated if generated else 0.0
        timed = [m for m in ms if m["workload"] == "all"]
        passes = None
        if timed and all(m["target_passes"] is not None for m in timed):
            passes = sum(m["target_passes"] for m in timed) / max(sum(m["generated"] for m in timed), 1)
        speeds: dict[str, dict[int, float]] = {}
        for workload in WORKLOADS:
            totals: dict[int, list[float]] = {}
            for m in ms:
                if m["workload"] == workload:
                    total = totals.setdefault(m.get("repeat", 0), [0.0, 0.0])
                    total[0] += m["generated"]
                    total[1] += m["seconds"]
            speeds[workload] = {r: g / s for r, (g, s) in sorted(totals.items()) if s > 0}
        means = {w: statistics.fmean(v.values()) if v else None for w, v in speeds.items()}
        spreads = {w: (max(v.values()) - min(v.values())) / means[w] if v and means[w] else None
                   for w, v in speeds.items()}
        rows.append(Row(name, ms[0]["kind"], ms[0].get("tau"), ms[0].get("k"), accuracy, control_accuracy,
                        relative, fraction, passes, means, spreads, speeds,
                        len({m.get("repeat", 0) for m in ms})))
    return sorted(rows, key=_sort_key)


@dataclasses.dataclass(frozen=True)
class FrontierChecks:
    """The issue's checks on one task (arith): the chosen tau, its control margin, its speed."""

    task: str
    large_accuracy: float | None
    tau: float | None  # None: no faithful tau qualifies
    large_fraction: float | None
    accuracy: float | None
    ead_control_accuracy: float | None  # the chosen faithful row on the control prompts
    control_accuracy: float | None  # the random row at the same fraction (None: none was run)
    margin_points: float | None
    best_fixed: dict[str, str | None]  # workload -> fixed-K row with the highest mean tokens/s
    speed_ratios: dict[str, dict[int, float]]  # workload -> repeat -> ead-speculative / best fixed

    @property
    def margin_ok(self) -> bool | None:
        return None if self.margin_points is None else self.margin_points >= MIN_MARGIN_POINTS

    def beats_best_fixed(self, workload: str) -> bool | None:
        ratios = self.speed_ratios.get(workload)
        return None if not ratios else all(r > 1 for r in ratios.values())


def frontier_checks(rows: Sequence[Row], task: str = "arith") -> FrontierChecks:
    by_name = {r.name: r for r in rows}
    large = by_name.get("large")
    large_accuracy = large.accuracy.get(task) if large else None
    candidates = [r for r in rows if r.kind == "ead-faithful" and task in r.accuracy
                  and large_accuracy is not None and r.accuracy[task] >= ACCURACY_SHARE * large_accuracy
                  and r.large_fraction[task] <= MAX_LARGE_FRACTION]
    best_fixed: dict[str, str | None] = {}
    for workload in WORKLOADS:
        fixed = [r for r in rows if r.kind == "fixed" and r.tokens_per_s.get(workload) is not None]
        best_fixed[workload] = max(fixed, key=lambda r: r.tokens_per_s[workload]).name if fixed else None
    if not candidates:
        return FrontierChecks(task, large_accuracy, None, None, None, None, None, None, best_fixed, {})
    chosen = min(candidates, key=lambda r: (r.large_fraction[task], -r.accuracy[task], r.tau))
    control = next((r for r in rows if r.kind == "random" and r.tau == chosen.tau), None)
    control_accuracy = control.accuracy.get(task) if control else None
    ead_control = chosen.control_accuracy[task]
    margin = None if control_accuracy is None else 100.0 * (ead_control - control_accuracy)
    speculative = by_name.get(ead_row("speculative", chosen.tau))
    ratios: dict[str, dict[int, float]] = {}
    for workload, fixed_name in best_fixed.items():
        if speculative is None or fixed_name is None:
            continue
        mine = speculative.tokens_per_s_by_repeat[workload]
        theirs = by_name[fixed_name].tokens_per_s_by_repeat[workload]
        ratios[workload] = {r: mine[r] / theirs[r] for r in mine if theirs.get(r)}
    return FrontierChecks(task, large_accuracy, chosen.tau, chosen.large_fraction[task], chosen.accuracy[task],
                          ead_control, control_accuracy, margin, best_fixed, ratios)


# --- the table, the footer, the plot -------------------------------------------------------------


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _speed(row: Row, workload: str) -> str:
    value, spread = row.tokens_per_s.get(workload), row.tokens_per_s_spread.get(workload)
    if value is None:
        return ""
    return f"{value:.1f}" + (f" ±{spread:.0%}" if spread and row.repeats > 1 else "")


def format_table(rows: Sequence[Row], tasks: Sequence[str], n: int, control_prompts: int) -> str:
    primary = tasks[0]
    header = ["configuration", "tau", *(f"{t} acc" for t in tasks), f"{primary} acc (first {control_prompts})",
              f"{primary} vs large", *(f"large fraction {t}" for t in tasks), "target passes/token",
              f"tokens/s (batch {n})", "tokens/s (batch 1)"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    for row in rows:
        relative = row.relative_accuracy.get(primary)
        cells = [row.name, "" if row.tau is None else f"{row.tau:g}",
                 *(_number(row.accuracy.get(t)) for t in tasks), _number(row.control_accuracy.get(primary)),
                 "" if row.kind == "large" or relative is None else f"{relative:.2f}x",
                 *(_number(row.large_fraction.get(t)) for t in tasks), _number(row.target_passes_per_token),
                 _speed(row, "all"), _speed(row, "batch1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_footer(checks: FrontierChecks, control_prompts: int) -> str:
    t = checks.task
    lines = [f"Checks on {t} (random rows: accuracy on the first {control_prompts} prompts; "
             "the control runs once, not timed):"]
    if checks.large_accuracy is None:
        return "\n".join([*lines, f"- no `large` row with {t}: nothing to check"])
    if checks.tau is None:
        lines.append(f"- smallest-large-fraction faithful tau with {t} accuracy >= {ACCURACY_SHARE} x large's "
                     f"({checks.large_accuracy:.3f}) and large fraction <= {MAX_LARGE_FRACTION}: none")
        return "\n".join(lines)
    lines.append(f"- smallest-large-fraction faithful tau with {t} accuracy >= {ACCURACY_SHARE} x large's "
                 f"({checks.large_accuracy:.3f}) and large fraction <= {MAX_LARGE_FRACTION}: tau {checks.tau:g} "
                 f"(large fraction {checks.large_fraction:.3f}, accuracy {checks.accuracy:.3f})")
    if checks.margin_points is None:
        lines.append("- margin over the random control at the same fraction: no control row for this tau")
    else:
        verdict = "yes" if checks.margin_ok else "no"
        lines.append(f"- margin over the random control at the same fraction: {checks.ead_control_accuracy:.3f} vs "
                     f"{checks.control_accuracy:.3f} = {checks.margin_points:+.1f} points "
                     f"(>= {MIN_MARGIN_POINTS:g} required): {verdict}")
    for workload, label in (("batch1", "batch 1"), ("all", "all prompts at once")):
        fixed, ratios = checks.best_fixed.get(workload), checks.speed_ratios.get(workload)
        if not fixed or not ratios:
            lines.append(f"- {ead_row('speculative', checks.tau)} vs best fixed K, {label}: not measured")
            continue
        shown = ", ".join(f"{v:.2f}x" for _, v in sorted(ratios.items()))
        wins = sum(v > 1 for v in ratios.values())
        lines.append(f"- {ead_row('speculative', checks.tau)} vs best fixed K ({fixed}) in tokens/s, {label}, "
                     f"per repeat: {shown}; faster in {wins}/{len(ratios)} repeats: "
                     f"{'yes' if checks.beats_best_fixed(workload) else 'no'}")
    return "\n".join(lines)


def plot_frontier(rows: Sequence[Row], task: str, path: Path, control_prompts: int) -> None:
    """x: large fraction, y: accuracy on `task` (left); batch-1 tokens/s (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (quality, speed) = plt.subplots(1, 2, figsize=(12, 5))
    styles = {"small": ("s", "tab:green"), "large": ("D", "tab:red"), "fixed": ("^", "tab:purple"),
              "ead-faithful": ("o-", "tab:blue"), "ead-speculative": ("o--", "tab:orange"),
              "random": ("x:", "tab:gray")}
    labels = {"fixed": "fixed K (lossless)", "random": f"random control (first {control_prompts} prompts)"}
    for kind, (style, color) in styles.items():
        group = [r for r in rows if r.kind == kind and task in r.accuracy]
        if not group:
            continue
        group.sort(key=lambda r: r.large_fraction[task])
        xs = [r.large_fraction[task] for r in group]
        label = labels.get(kind, kind)
        quality.plot(xs, [r.accuracy[task] for r in group], style, color=color, label=label)
        speeds = [(x, r.tokens_per_s.get("batch1")) for x, r in zip(xs, group)]
        if any(s is not None for _, s in speeds):
            speed.plot([x for x, s in speeds if s is not None], [s for _, s in speeds if s is not None],
                       style, color=color, label=label)
        for x, r in zip(xs, group):
            if kind == "ead-faithful":
                quality.annotate(f"{r.tau:g}", (x, r.accuracy[task]), textcoords="offset points",
                                 xytext=(4, 4), fontsize=7, color=color)
            if kind == "fixed" and r.tokens_per_s.get("batch1") is not None:  # all at x = 1
                speed.annotate(r.name, (x, r.tokens_per_s["batch1"]), textcoords="offset points",
                               xytext=(-40, 0), fontsize=7, color=color)
    quality.axvline(MAX_LARGE_FRACTION, color="lightgray", linestyle="--", linewidth=1)
    quality.set(xlabel="large fraction (tokens the large model wrote / generated)", ylabel=f"{task} accuracy",
                title=f"EAD frontier on {task} (labels: tau, bits)", xlim=(-0.03, 1.05), ylim=(-0.03, 1.03))
    speed.set(xlabel="large fraction", ylabel="tokens/s, batch 1 (all tasks)", title="speed", xlim=(-0.03, 1.05))
    quality.legend(fontsize=8)
    speed.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def row_record(row: Row, tasks: Sequence[str]) -> dict[str, Any]:
    """A flat CSV row."""
    record: dict[str, Any] = {"name": row.name, "kind": row.kind, "tau": row.tau, "k": row.k}
    for task in tasks:
        record[f"accuracy_{task}"] = row.accuracy.get(task)
        record[f"control_accuracy_{task}"] = row.control_accuracy.get(task)
        record[f"relative_accuracy_{task}"] = row.relative_accuracy.get(task)
        record[f"large_fraction_{task}"] = row.large_fraction.get(task)
    record["target_passes_per_token"] = row.target_passes_per_token
    for workload in WORKLOADS:
        record[f"tokens_per_s_{workload}"] = row.tokens_per_s.get(workload)
        record[f"tokens_per_s_spread_{workload}"] = row.tokens_per_s_spread.get(workload)
    record["repeats"] = row.repeats
    return record


# --- the orchestrator ---------------------------------------------------------------------------


def score(measurement: dict[str, Any], examples: Sequence[Any]) -> dict[str, Any]:
    """The measurement with `correct`: the task's `is_correct` on each generated text."""
    if "texts" not in measurement:
        return measurement
    module = task_module(measurement["task"])
    return {**measurement, "correct": [bool(module.is_correct(e, text))
                                       for e, text in zip(examples, measurement["texts"])]}


def run_in_subprocess(kind: str, spec: Mapping[str, Any], folder: Path, tag: str) -> dict[str, Any]:
    spec_path, out_path, log_path = folder / f"{tag}.spec.json", folder / f"{tag}.json", folder / f"{tag}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # collective_rpc with a callable
    with log_path.open("w") as log:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.ead_frontier", "--child", kind, str(spec_path),
                               str(out_path)], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=4 * 3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed (exit {proc.returncode}); see {log_path}")
    return json.loads(out_path.read_text())


def _int_list(value: str) -> list[int]:
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 2,4,6, got {value!r}") from None


def _float_list(value: str) -> list[float]:
    try:
        return [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,1,2, got {value!r}") from None


def _max_tokens(value: str) -> dict[str, int]:
    try:
        return {task.strip(): int(n) for task, n in (item.split("=", 1) for item in value.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TASK=N,..., e.g. arith=128,text=64, got {value!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ead_frontier", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="target", help="large model: a folder or a trained model's name")
    parser.add_argument("--draft", default="small", help="small model: a folder or a shipped model's name (draft, target, small)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated, from arith,text,recall; the first is the frontier's (plot, checks)")
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per task")
    parser.add_argument("--ks", type=_int_list, default=list(DEFAULT_KS), help="fixed K rows, e.g. 2,4,6")
    parser.add_argument("--taus", type=_float_list, default=list(DEFAULT_TAUS), help="EAD tau values (bits)")
    parser.add_argument("--ead-k", type=int, default=DEFAULT_EAD_K, help="draft length of the routed engines")
    parser.add_argument("--ead-window", type=int, default=5, help="ead_window of every EAD request")
    parser.add_argument("--ead-min-stint", type=int, default=0, help="ead_min_stint of every EAD request")
    parser.add_argument("--ead-large-draft", type=int, default=None,
                        help="routing.large_draft_tokens of the routed engines (default: null, drafts to K)")
    parser.add_argument("--ead-draft-fraction", type=float, default=0.0,
                        help="routing.min_drafting_fraction of the routed engines (default 0: the loop "
                             "runs while any row drafts)")
    parser.add_argument("--batch1-prompts", type=int, default=8, help="prompts per task timed one at a time")
    parser.add_argument("--control-prompts", type=int, default=30, help="prompts per task the random control runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out set seed")
    parser.add_argument("--control-seed", type=int, default=CONTROL_SEED, help="seed of the control's coins")
    parser.add_argument("--max-tokens", type=_max_tokens, default={},
                        help=f"per task generation limit, e.g. arith=64 (default {MAX_TOKENS})")
    parser.add_argument("--kv-cache-bytes", type=int, default=KV_CACHE_BYTES, help="KV cache of every engine")
    parser.add_argument("--engine-args", type=json.loads, default=dict(DEFAULT_ENGINE_ARGS),
                        help="extra LLM(...) arguments for every engine, JSON "
                             f"(default '{json.dumps(DEFAULT_ENGINE_ARGS)}')")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/ead-frontier/<date-time>)")
    args = parser.parse_args(argv)
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.task_list or (bad := [t for t in args.task_list if t not in MAX_TOKENS]):
        parser.error(f"--tasks: unknown {bad if args.task_list else 'empty list'}; known: {sorted(MAX_TOKENS)}")
    if bad := sorted(set(args.max_tokens) - set(MAX_TOKENS)):
        parser.error(f"--max-tokens: unknown tasks {bad}; known: {sorted(MAX_TOKENS)}")
    if any(n < 1 for n in args.max_tokens.values()):
        parser.error(f"--max-tokens: every limit must be >= 1, got {args.max_tokens}")
    args.max_tokens = {t: args.max_tokens.get(t, MAX_TOKENS[t]) for t in args.task_list}
    if not args.ks or any(k < 1 for k in args.ks):
        parser.error(f"--ks: give at least one K, each >= 1, got {args.ks}")
    if not args.taus or any(not 0 < tau < math.inf for tau in args.taus):
        parser.error(f"--taus: give at least one tau, each in (0, inf) bits, got {args.taus}")
    if args.ead_k < 1:
        parser.error(f"--ead-k must be >= 1, got {args.ead_k}")
    if args.ead_large_draft is not None and args.ead_large_draft < 1:
        parser.error(f"--ead-large-draft must be >= 1, got {args.ead_large_draft}")
    if not 0 <= args.ead_draft_fraction <= 1:
        parser.error(f"--ead-draft-fraction must be in [0, 1], got {args.ead_draft_fraction}")
    if args.n < 1 or args.repeats < 1:
        parser.error(f"--n and --repeats must be >= 1, got {args.n} and {args.repeats}")
    for name in ("batch1_prompts", "control_prompts"):
        if not 0 <= getattr(args, name) <= args.n:
            parser.error(f"--{name.replace('_', '-')} must be in [0, --n={args.n}], got {getattr(args, name)}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        run = {"engine": run_engine, "control": run_control}[argv[1]]
        Path(argv[3]).write_text(json.dumps(run(json.loads(Path(argv[2]).read_text()))))
        return
    args = parse_args(argv)
    from benchmarks.evaluate import resolve_model

    target, draft = resolve_model(args.target).path, resolve_model(args.draft).path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target)
    examples = {t: eval_examples(t, args.seed, args.n) for t in args.task_list}
    workloads = [{"task": t, "max_tokens": args.max_tokens[t], "batch1": args.batch1_prompts,
                  "prompts": [tokenizer.encode(e.prompt) for e in examples[t]]} for t in args.task_list]
    base_spec = {"target": target, "draft": draft, "workloads": workloads, "kv_cache_bytes": args.kv_cache_bytes,
                 "engine_args": args.engine_args}
    out = args.out or Path("results") / "ead-frontier" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / "engines").mkdir(parents=True, exist_ok=True)
    configs = engine_configs(args.ks, args.ead_k)
    ead_keys = {"ead_window": args.ead_window, "ead_min_stint": args.ead_min_stint}
    runs, measurements = [], []
    for repeat in range(args.repeats):
        order = list(configs)
        random.Random(repeat).shuffle(order)
        for config in order:
            print(f"repeat {repeat + 1}/{args.repeats}: {config.name}", file=sys.stderr, flush=True)
            spec = {**base_spec, "config": dataclasses.asdict(config), "taus": args.taus, "ead_keys": ead_keys,
                    "large_draft_tokens": args.ead_large_draft, "min_drafting_fraction": args.ead_draft_fraction}
            result = run_in_subprocess("engine", spec, out / "engines", f"r{repeat}-{config.name}")
            runs.append({"repeat": repeat, **result})
            measurements += [{**score(m, examples[m["task"]]), "repeat": repeat} for m in result["measurements"]]
            if failures := sum(m.get("routing_failures", 0) for m in result["measurements"]):
                print(f"warning: {config.name}: {failures} routing failures (see {out / 'engines'})",
                      file=sys.stderr, flush=True)
            (out / "runs.json").write_text(json.dumps(runs))
    plan = control_plan(summarise(measurements, args.control_prompts), args.task_list)
    if plan and args.control_prompts:
        print(f"random control: {len(plan)} fractions", file=sys.stderr, flush=True)
        spec = {**base_spec, "plan": plan, "control_prompts": args.control_prompts, "seed": args.control_seed}
        result = run_in_subprocess("control", spec, out / "engines", "control")
        runs.append({"repeat": None, **result})
        measurements += [score(m, examples[m["task"]]) for m in result["measurements"]]
        (out / "runs.json").write_text(json.dumps(runs))
    rows = summarise(measurements, args.control_prompts)
    checks = frontier_checks(rows, args.task_list[0])
    table = format_table(rows, args.task_list, args.n, args.control_prompts)
    footer = format_footer(checks, args.control_prompts)
    meta = {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "target": target,
            "draft": draft, "tasks": args.task_list, "n": args.n, "seed": args.seed, "ks": args.ks,
            "taus": args.taus, "ead_k": args.ead_k, "ead_large_draft": args.ead_large_draft,
            "ead_draft_fraction": args.ead_draft_fraction, **ead_keys,
            "batch1_prompts": args.batch1_prompts,
            "control_prompts": args.control_prompts, "control_seed": args.control_seed, "repeats": args.repeats,
            "max_tokens": args.max_tokens, "kv_cache_bytes": args.kv_cache_bytes, "engine_args": args.engine_args,
            "engine_seconds": {f"r{r['repeat']}-{r['config']}": r["seconds"] for r in runs},
            "command": " ".join(["python -m benchmarks.ead_frontier", *argv])}
    payload = {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows], "checks": dataclasses.asdict(checks)}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    records = [row_record(r, args.task_list) for r in rows]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    (out / "table.md").write_text(f"{table}\n\n{footer}\n")
    plot_frontier(rows, args.task_list[0], out / "frontier.png", args.control_prompts)
    print(f"{table}\n\n{footer}")
    print(f"\nwritten to {out}/ (results.json, results.csv, table.md, frontier.png, runs.json, engines/)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
