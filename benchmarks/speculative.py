"""Speculative decoding in vLLM's CPU engine: no speculation, fixed K, ngram, adaptive draft length.

    python -m benchmarks.speculative                     # the trained pair, arith and text, batch 1 and 32
    python -m benchmarks.speculative --batch-sizes 32,64 --mixed 48   # + batch 64 and a mixed batch

Configurations (columns of the table, one engine each):

- `none`: the target alone;
- `k1` ... `k8`: vLLM's draft-model method (`"method": "draft_model"`) with the trained draft and
  a fixed number of speculative tokens K;
- `ngram`: vLLM's prompt-lookup method (`"method": "ngram"`, K = --ngram-k, lookup 2-4 tokens);
- `adaptive`: vllm-adaptive's draft length (`--plugin adaptive`, `speculative.enabled: true`) on
  the draft-model method with up to --adaptive-k tokens (stop rule and controller: the config's
  defaults, or --adaptive-config), tuned by what it measures on this machine;
- `adaptive@gpu`: the same, behaving as it would where a draft pass costs --cost-ratio of a step
  (`draft_cost_ratio` pinned to it, controller off): the row whose modelled speedup compares
  with fixed K's.

Every engine runs in the same environment, with the plugin installed; only `adaptive` switches it
on (installed but off, the plugin leaves vLLM's outputs unchanged: tests/engine). Each engine runs in its own process and, per task, times the held-out prompts
(benchmarks.tasks.mixture.eval_examples, greedy) one at a time (batch 1: --batch1-prompts of
them, prefix cache reset before each) and, for each of --batch-sizes, that many at once; with
--mixed N, also a `mixed` workload: N prompts at once, taken in turn from arith, text and recall
(each with its task's max_tokens), as a server sees them. The whole list of
configurations runs --repeats times, in a different order each time (interleaved: this machine
is noisy), and every ratio is taken between engines of the same repeat, then averaged.

Columns:
- tokens/s: generated tokens / wall time of the generate calls;
- speedup: tokens/s over `none`'s in the same repeat (mean over repeats);
- accepted length: vLLM's mean acceptance length, 1 + accepted / drafts, over the steps where a
  request had a draft (1.0 without speculation);
- target passes/token: engine steps (target forward passes) / generated tokens;
- draft passes/token: draft-model forward passes / generated tokens (K per step for vLLM's
  fixed K, counted by the proposer for adaptive, 0 for none and ngram);
- modelled speedup: what the same passes would give where a draft pass costs --cost-ratio of a
  target pass (0.05: a GPU-like ratio; batch 1, where verifying K+1 tokens costs about one
  target pass): (passes + ratio x draft passes) per token for `none` over the same for the
  configuration;
- identical: the fraction of prompts whose greedy tokens equal `none`'s (1.0 for a lossless method).

Writes results.json, results.csv and table.md to --out (default results/speculative/<date-time>/).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.tasks.mixture import EVAL_SEED, eval_examples

DEFAULT_TASKS = ("arith", "text")
DEFAULT_KS = tuple(range(1, 9))
MAX_TOKENS = {"arith": 128, "recall": 8, "text": 64}
KV_CACHE_BYTES = 1 << 30
MAX_MODEL_LEN = 2048
ENGINE_SEED = 0
GPU_COST_RATIO = 0.05
# float32, as the models were trained: vLLM's default on this CPU (bfloat16) rounds a
# multi-token verification pass differently from a one-token decode often enough that greedy
# outputs of any speculative method, vLLM's own included, differ from no speculation at near-ties.
DEFAULT_ENGINE_ARGS = {"dtype": "float32"}


@dataclasses.dataclass(frozen=True)
class Config:
    """One engine configuration: a name, its speculative config and, for adaptive, its plugin config."""

    name: str
    speculative: dict[str, Any] | None = None
    adaptive: dict[str, Any] | None = None  # plugin config: the engine runs with --plugin adaptive

    @property
    def fixed_k(self) -> int:
        """Draft-model passes per step for vLLM's method (0 otherwise)."""
        if self.speculative and self.speculative.get("method") == "draft_model" and self.adaptive is None:
            return int(self.speculative["num_speculative_tokens"])
        return 0


def configurations(draft: str, ks: Sequence[int], ngram_k: int, adaptive_k: int,
                   adaptive_config: Mapping[str, Any] | None = None,
                   gpu_cost_ratio: float = GPU_COST_RATIO) -> list[Config]:
    configs = [Config("none")]
    configs += [Config(f"k{k}", {"method": "draft_model", "model": draft, "num_speculative_tokens": k})
                for k in ks]
    if ngram_k:
        configs.append(Config("ngram", {"method": "ngram", "num_speculative_tokens": ngram_k,
                                        "prompt_lookup_min": 2, "prompt_lookup_max": 4}))
    if adaptive_k:
        speculative = {"method": "draft_model", "model": draft, "num_speculative_tokens": adaptive_k}
        section = {"enabled": True, "max_draft_tokens": adaptive_k, **dict(adaptive_config or {})}
        configs.append(Config("adaptive", speculative, {"speculative": section}))
        # As it would run where a draft pass costs `gpu_cost_ratio` of a step: the ratio pinned
        # (the stop rule's threshold follows it), the controller off (at batch 1 on a GPU,
        # speculation pays); its modelled speedup is the one to compare with fixed K's.
        gpu = {**section, "draft_cost_ratio": gpu_cost_ratio, "controller": False}
        configs.append(Config("adaptive@gpu", speculative, {"speculative": gpu}))
    return configs


# --- one engine, in its own process --------------------------------------------------------------


def _counters(llm: Any) -> dict[str, float]:
    """vLLM's counters the table needs, summed over labels (engine steps: the iteration histogram's count)."""
    wanted = {"vllm:spec_decode_num_drafts": "drafts", "vllm:spec_decode_num_draft_tokens": "draft_tokens",
              "vllm:spec_decode_num_accepted_tokens": "accepted_tokens", "vllm:iteration_tokens_total": "steps",
              "vllm:generation_tokens": "generation_tokens"}
    values = dict.fromkeys(wanted.values(), 0.0)
    for metric in llm.get_metrics():
        name = metric.name.removesuffix("_total") if metric.name not in wanted else metric.name
        key = wanted.get(metric.name) or wanted.get(name)
        if key is None:
            continue
        values[key] += float(metric.count if key == "steps" else metric.value)
    return values


def _adaptive_passes(llm: Any) -> float:
    from vllm_adaptive.introspection import adaptive_worker_state

    states = llm.collective_rpc(adaptive_worker_state)
    return float(sum((s["speculative"] or {}).get("counters", {}).get("draft_passes", 0) for s in states))


def _sampling_params(workload: Mapping[str, Any]) -> Any:
    """Greedy SamplingParams for the workload: one, or one per prompt (a mixed workload)."""
    from vllm import SamplingParams

    limits = workload["max_tokens"]
    if isinstance(limits, list):
        return [SamplingParams(temperature=0.0, max_tokens=n) for n in limits]
    return SamplingParams(temperature=0.0, max_tokens=limits)


def run_engine(target: str, config: Config, workloads: list[dict[str, Any]],
               engine_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Start one engine for `config`, run every workload, return their figures and outputs."""
    from vllm import LLM, SamplingParams

    from benchmarks.evaluate import model_max_len

    engine = {"kv_cache_memory_bytes": KV_CACHE_BYTES, "max_model_len": model_max_len(target, MAX_MODEL_LEN),
              "seed": ENGINE_SEED, "disable_log_stats": False, **dict(engine_args or {})}
    if config.adaptive is not None:
        import vllm_adaptive

        kwargs = vllm_adaptive.engine_kwargs(config.adaptive, speculative_config=config.speculative, **engine)
    else:
        kwargs = {**engine, **({"speculative_config": config.speculative} if config.speculative else {})}
    started = time.perf_counter()
    llm = LLM(target, **kwargs)
    startup = time.perf_counter() - started
    results = []
    try:
        warm = SamplingParams(temperature=0.0, max_tokens=8)
        llm.generate([{"prompt_token_ids": workloads[0]["prompts"][0]}], warm, use_tqdm=False)
        for workload in workloads:
            params = _sampling_params(workload)
            prompts = [{"prompt_token_ids": ids} for ids in workload["prompts"]]
            llm.reset_prefix_cache()
            before = _counters(llm)
            passes_before = _adaptive_passes(llm) if config.adaptive is not None else 0.0
            seconds, outputs = 0.0, []
            if workload["batch"] == 1:
                for prompt in prompts:
                    llm.reset_prefix_cache()  # each request pays its own prefill
                    start = time.perf_counter()
                    outputs += llm.generate([prompt], params, use_tqdm=False)
                    seconds += time.perf_counter() - start
            else:
                start = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - start
            after = _counters(llm)
            delta = {k: after[k] - before[k] for k in after}
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            generated = sum(map(len, tokens))
            if config.adaptive is not None:
                draft_passes = _adaptive_passes(llm) - passes_before
            else:
                draft_passes = config.fixed_k * delta["steps"]
            results.append({"task": workload["task"], "batch": workload["batch"], "seconds": seconds,
                            "generated": generated, "draft_passes": draft_passes, **delta, "tokens": tokens})
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"config": config.name, "startup_seconds": startup, "workloads": results}


def _child_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = run_engine(spec["target"], Config(**spec["config"]), spec["workloads"], spec.get("engine_args"))
    Path(out_path).write_text(json.dumps(result))


# --- the orchestrator ---------------------------------------------------------------------------


MIXED_TASKS = ("arith", "text", "recall")


def build_workloads(tokenizer_path: str, tasks: Sequence[str], batch1_prompts: int, batch_sizes: Sequence[int],
                    seed: int, mixed: int = 0) -> list[dict[str, Any]]:
    """Per task: batch 1 (`batch1_prompts` prompts) and each batch size; then, with `mixed`, one
    batch of `mixed` prompts taking arith, text and recall in turn (each its own max_tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    workloads: list[dict[str, Any]] = []
    for task in tasks:
        examples = eval_examples(task, seed, max(batch1_prompts, *batch_sizes, 1))
        ids = [tokenizer.encode(e.prompt) for e in examples]
        if batch1_prompts:
            workloads.append({"task": task, "batch": 1, "max_tokens": MAX_TOKENS[task], "prompts": ids[:batch1_prompts]})
        for batch_size in batch_sizes:
            if batch_size > 1:
                workloads.append({"task": task, "batch": batch_size, "max_tokens": MAX_TOKENS[task],
                                  "prompts": ids[:batch_size]})
    if mixed:
        per_task = -(-mixed // len(MIXED_TASKS))
        pools = {t: [tokenizer.encode(e.prompt) for e in eval_examples(t, seed, per_task)] for t in MIXED_TASKS}
        order = [MIXED_TASKS[i % len(MIXED_TASKS)] for i in range(mixed)]
        workloads.append({"task": "mixed", "batch": mixed, "max_tokens": [MAX_TOKENS[t] for t in order],
                          "prompts": [pools[t][i // len(MIXED_TASKS)] for i, t in enumerate(order)]})
    return workloads


def run_one_in_subprocess(target: str, config: Config, workloads: list[dict[str, Any]], folder: Path,
                          tag: str, engine_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    spec_path, out_path = folder / f"{tag}.spec.json", folder / f"{tag}.json"
    spec_path.write_text(json.dumps({"target": target, "config": dataclasses.asdict(config), "workloads": workloads,
                                     "engine_args": dict(engine_args or {})}))
    # Every engine runs in the same environment (the plugin installed; only `adaptive` turns it
    # on): on this 2-core machine, engines' busy-waiting processes make timings sensitive to
    # anything that differs between runs, so nothing else may.
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    log = (folder / f"{tag}.log").open("w")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speculative", "--child", str(spec_path), str(out_path)],
                          env=env, stdout=log, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"engine {config.name} failed (exit {proc.returncode}); see {folder / f'{tag}.log'}")
    return json.loads(out_path.read_text())


@dataclasses.dataclass(frozen=True)
class Row:
    config: str
    task: str
    batch: int
    tokens_per_s: float
    tokens_per_s_spread: float  # (max - min) / mean over repeats
    speedup: float  # over `none`, same repeat, mean over repeats
    accepted_length: float
    target_passes_per_token: float
    draft_passes_per_token: float
    modelled_speedup: float | None  # batch 1 only
    identical: float
    repeats: int


def summarise(runs: list[dict[str, Any]], cost_ratio: float) -> list[Row]:
    """`runs`: one entry per (repeat, config) with its workloads. Ratios are taken within a repeat."""
    by_repeat: dict[int, dict[str, dict[tuple[str, int], dict[str, Any]]]] = {}
    for run in runs:
        by_repeat.setdefault(run["repeat"], {})[run["config"]] = {(w["task"], w["batch"]): w for w in run["workloads"]}
    configs = list(dict.fromkeys(run["config"] for run in runs))
    keys = list(dict.fromkeys((w["task"], w["batch"]) for run in runs for w in run["workloads"]))
    rows = []
    for config in configs:
        for key in keys:
            per_repeat = [(r[config][key], r["none"][key]) for r in by_repeat.values() if config in r and "none" in r]
            if not per_repeat:
                continue
            speeds = [w["generated"] / w["seconds"] for w, _ in per_repeat]
            speedups = [(w["generated"] / w["seconds"]) / (b["generated"] / b["seconds"]) for w, b in per_repeat]
            generated = sum(w["generated"] for w, _ in per_repeat)
            steps = sum(w["steps"] for w, _ in per_repeat)
            draft_passes = sum(w["draft_passes"] for w, _ in per_repeat)
            drafts = sum(w["drafts"] for w, _ in per_repeat)
            accepted = sum(w["accepted_tokens"] for w, _ in per_repeat)
            base_generated = sum(b["generated"] for _, b in per_repeat)
            base_steps = sum(b["steps"] for _, b in per_repeat)
            modelled = None
            if key[1] == 1:
                cost = (steps + cost_ratio * draft_passes) / generated
                modelled = (base_steps / base_generated) / cost
            same = [a == b for w, base in per_repeat for a, b in zip(w["tokens"], base["tokens"])]
            mean = statistics.fmean(speeds)
            rows.append(Row(config, key[0], key[1], mean, (max(speeds) - min(speeds)) / mean if mean else 0.0,
                            statistics.fmean(speedups), 1.0 + accepted / drafts if drafts else 1.0,
                            steps / generated, draft_passes / generated, modelled,
                            sum(same) / len(same), len(per_repeat)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    best_fixed: dict[tuple[str, int], tuple[float, float]] = {}
    for row in rows:
        if row.config.startswith("k") and row.config[1:].isdigit():
            speed, modelled = best_fixed.get((row.task, row.batch), (0.0, 0.0))
            best_fixed[(row.task, row.batch)] = (max(speed, row.speedup), max(modelled, row.modelled_speedup or 0.0))
    header = ("| task | batch | configuration | tokens/s | speedup | vs best fixed K | accepted length | "
              "target passes/token | draft passes/token | modelled speedup (GPU ratio) | identical |")
    lines = [header, "|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for row in sorted(rows, key=lambda r: (r.task, r.batch)):
        best = best_fixed.get((row.task, row.batch))
        adaptive = row.config.startswith("adaptive")
        vs_best = f"{row.speedup / best[0]:.2f}x" if best and adaptive else ""
        if best and adaptive and row.modelled_speedup is not None and best[1]:
            vs_best += f" ({row.modelled_speedup / best[1]:.2f}x modelled)"
        modelled = "" if row.modelled_speedup is None else f"{row.modelled_speedup:.2f}x"
        lines.append(f"| {row.task} | {row.batch} | {row.config} | {row.tokens_per_s:.1f} ±{row.tokens_per_s_spread:.0%} | "
                     f"{row.speedup:.2f}x | {vs_best} | {row.accepted_length:.2f} | {row.target_passes_per_token:.3f} | "
                     f"{row.draft_passes_per_token:.2f} | {modelled} | {row.identical:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speculative", description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="target", help="target model: a folder or a trained model's name")
    parser.add_argument("--draft", default="draft", help="draft model: a folder or a trained model's name")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated: arith,text,recall")
    parser.add_argument("--ks", default="1-8", help="fixed K values for vLLM's draft-model method: 1-8 or 1,2,4")
    parser.add_argument("--ngram-k", type=int, default=4, help="K for vLLM's ngram method (0: leave it out)")
    parser.add_argument("--adaptive-k", type=int, default=8, help="max draft tokens for adaptive (0: leave it out)")
    parser.add_argument("--adaptive-config", type=Path, default=None,
                        help="YAML/JSON file with the plugin's `speculative` section for the adaptive run")
    parser.add_argument("--batch1-prompts", type=int, default=8, help="prompts timed one at a time per task")
    parser.add_argument("--batch-sizes", "--batch-size", default="32",
                        help="comma-separated: prompts generated at once per task, one workload each (e.g. 32,64)")
    parser.add_argument("--mixed", type=int, default=0,
                        help="a mixed workload: this many prompts at once, arith, text and recall in turn (0: none)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cost-ratio", type=float, default=GPU_COST_RATIO,
                        help="draft/target cost per pass for the modelled speedup")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out set seed")
    parser.add_argument("--configs", default=None, help="only these configurations, comma-separated (none is always run)")
    parser.add_argument("--engine-args", type=json.loads, default=dict(DEFAULT_ENGINE_ARGS),
                        help="extra LLM(...) arguments for every engine, JSON (default: "
                             f"'{json.dumps(DEFAULT_ENGINE_ARGS)}'; '{{}}' for vLLM's defaults)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if "-" in args.ks:
            low, high = (int(x) for x in args.ks.split("-"))
            args.k_list = list(range(low, high + 1))
        else:
            args.k_list = [int(x) for x in args.ks.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--ks: expected a range like 1-8 or a list like 1,2,4, got {args.ks!r}")
    if any(k < 1 for k in args.k_list):
        parser.error(f"--ks: every K must be >= 1, got {args.k_list}")
    try:
        args.batch_size_list = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--batch-sizes: expected numbers like 32,64, got {args.batch_sizes!r}")
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if bad := [t for t in args.task_list if t not in MAX_TOKENS]:
        parser.error(f"--tasks: unknown {bad}; known: {sorted(MAX_TOKENS)}")
    if args.repeats < 1 or args.batch1_prompts < 0 or any(b < 0 for b in args.batch_size_list) or args.mixed < 0:
        parser.error("--repeats must be >= 1, --batch1-prompts, --batch-sizes and --mixed >= 0")
    if not 0 <= args.cost_ratio < 1:
        parser.error(f"--cost-ratio must be in [0, 1), got {args.cost_ratio}")
    return args


def resolve(name: str) -> str:
    from benchmarks.evaluate import resolve_model

    return resolve_model(name).path


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _child_main(argv[1], argv[2])
        return
    args = parse_args(argv)
    target, draft = resolve(args.target), resolve(args.draft)
    adaptive_section = None
    if args.adaptive_config is not None:
        from vllm_adaptive.config import AdaptiveConfig

        adaptive_section = {k: v for k, v in AdaptiveConfig.from_file(args.adaptive_config).to_dict()["speculative"].items()
                            if k not in ("enabled", "max_draft_tokens")}
    configs = configurations(draft, args.k_list, args.ngram_k, args.adaptive_k, adaptive_section, args.cost_ratio)
    if args.configs:
        keep = {c.strip() for c in args.configs.split(",")} | {"none"}
        if unknown := keep - {c.name for c in configs}:
            raise SystemExit(f"--configs: unknown {sorted(unknown)}; known: {[c.name for c in configs]}")
        configs = [c for c in configs if c.name in keep]
    workloads = build_workloads(target, args.task_list, args.batch1_prompts, args.batch_size_list, args.seed,
                                args.mixed)
    out = args.out or Path("results") / "speculative" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / "engines").mkdir(parents=True, exist_ok=True)
    runs = []
    for repeat in range(args.repeats):
        order = list(configs)
        random.Random(repeat).shuffle(order)
        for config in order:
            print(f"repeat {repeat + 1}/{args.repeats}: {config.name}", file=sys.stderr, flush=True)
            result = run_one_in_subprocess(target, config, workloads, out / "engines", f"r{repeat}-{config.name}",
                                           args.engine_args)
            runs.append({"repeat": repeat, **result})
            (out / "runs.json").write_text(json.dumps(runs))
    rows = summarise(runs, args.cost_ratio)
    table = format_table(rows)
    meta = {"created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "target": target,
            "draft": draft, "tasks": args.task_list, "batch1_prompts": args.batch1_prompts,
            "batch_sizes": args.batch_size_list, "mixed": args.mixed, "repeats": args.repeats, "cost_ratio": args.cost_ratio,
            "seed": args.seed, "engine_args": args.engine_args, "max_tokens": {t: MAX_TOKENS[t] for t in args.task_list},
            "configs": [dataclasses.asdict(c) for c in configs], "command": " ".join(["python -m benchmarks.speculative", *argv])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in dataclasses.fields(Row)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten to {out}/ (results.json, results.csv, table.md, runs.json, engines/)", file=sys.stderr)


if __name__ == "__main__":
    main()
