"""KV compaction (issue #18): recall accuracy of the trained target against the KV budget.

    python -m benchmarks.kv_recall     # shipped target, every kv_policy, full..1/16 of the prompt, n=100

One offline engine with `kvcache.enabled` (vllm_adaptive.kvcache) runs the recall task's held-out
examples (benchmarks.tasks.mixture.eval_examples, the evaluation harness's set, default prompt
length) greedily, once with the full cache and once per (policy, budget): `kv_budget` as a share
of the prompt and `kv_policy` in `extra_args`, the deployment's `kv_sinks`/`kv_buffer`. Scoring is
the harness's (`recall.is_correct` on the generated text); max_tokens is the completion's length
(value and newline). The engine core runs in this process, so each cell's compaction counters
(`CompactingScheduler.kv_snapshot()`: compactions, tokens kept and evicted, blocks freed) are
read before and after it.

Two protocols (--protocols):

- `prompt`: the example's prompt as it is, ending with the query's `key=` token. The scheduler
  compacts a request once its prompt is in the cache, which is after the prefill step has already
  sampled the first output token from the full cache. The value is one token, so the answer is
  written before any compaction: only the newline after it sees the compacted cache.
- `key-after`: the prompt without its final `key=` token; a logits processor (ForceFirstToken)
  makes that token the first output. The compaction runs in the step that computes that token,
  and the value is written from the compacted cache. `snapkv`'s observation window ends with
  that step's own query (vllm_adaptive.kvcache.worker, "The step's own query"), so the question
  is in its window, as in SnapKV's setting (the question closes the prompt); `h2o`'s and
  `keynorm`'s scores and `streaming`'s window are fixed before the model sees which key is
  asked. The forced token is removed before scoring.

`pair kept` is, for the streaming policy only, the share of prompts whose queried pair (its `key=`
and value tokens) is among the kept tokens (the first `sinks` and the most recent); scored
policies choose per layer and head, so it is not computed for them. `degraded` counts the
compactions of a scored policy that fell back to the streaming selection (the workers' counters,
read over collective_rpc); a cell with degraded compactions did not measure its policy.

Writes table.md, results.json (and accuracy.png where matplotlib is installed) to --out
(default results/kv-recall/<date-time>/), and prints the table. Budget `entropy` sends kv_budget
"entropy" (`entropy:M`: with kv_entropy_multiplier M; else the section's default, 1): each
request's budget follows its
window's attention (vllm_adaptive.kvcache.budget); `kept / request` shows what it kept on average.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fractions
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from benchmarks.evaluate import model_max_len, resolve_model
from benchmarks.tasks import recall
from benchmarks.tasks.example import Example
from benchmarks.tasks.mixture import EVAL_SEED, eval_examples
from vllm_adaptive.kvcache.config import KV_POLICIES
from vllm_adaptive.kvcache.params import ENTROPY, parse_request

DEFAULT_BUDGETS = ("full", "1/2", "1/4", "1/8", "1/16")
DEFAULT_N = 100
PROTOCOLS = ("prompt", "key-after")
KV_CACHE_BYTES = 512 << 20  # a small pool: other engines share this host
MAX_MODEL_LEN = 2048  # recall prompts are at most 1500 tokens
ENGINE_SEED = 0
FORCE_KEY = "kv_recall_force_first"  # extra_args key read by ForceFirstToken
FULL = "full"


class ForceFirstToken(AdapterLogitsProcessor):
    """Requests whose extra_args name a token under FORCE_KEY write that token first."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        token = (params.extra_args or {}).get(FORCE_KEY)
        if token is not None and (not isinstance(token, int) or token < 0):
            raise ValueError(f"{FORCE_KEY} must be a token id, got {token!r}")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        token = (params.extra_args or {}).get(FORCE_KEY)
        if token is None:
            return None

        def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            if output_ids:
                return logits
            forced = torch.full_like(logits, float("-inf"))
            forced[token] = 0.0
            return forced

        return force


@dataclasses.dataclass(frozen=True)
class Budget:
    label: str  # "full", "1/4", "0.3", "200", "entropy" or "entropy:0.25"
    # kv_budget: a share of the prompt in (0, 1), tokens >= 1, "entropy", None: no compaction
    value: float | int | str | None
    multiplier: float | None = None  # kv_entropy_multiplier ("entropy:M"; None: the deployment's)

    @staticmethod
    def parse(text: str) -> Budget:
        text = text.strip()
        if text == FULL:
            return Budget(FULL, None)
        if text == ENTROPY:
            return Budget(ENTROPY, ENTROPY)
        if text.startswith(ENTROPY + ":"):
            try:
                multiplier = float(text.split(":", 1)[1])
            except ValueError:
                multiplier = -1.0
            if not 0 < multiplier <= 1000:
                raise ValueError(f"budget {text!r}: the entropy multiplier must be a number in (0, 1000]")
            return Budget(text, ENTROPY, multiplier)
        try:
            number = fractions.Fraction(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"budget {text!r}: expected 'full', a share such as 1/8 or 0.125, tokens such as 200, "
                             f"or '{ENTROPY}'") from None
        if 0 < number < 1:
            return Budget(text, float(number))
        if number >= 1 and number.denominator == 1:
            return Budget(text, int(number))
        raise ValueError(f"budget {text!r}: a share must be in (0, 1), tokens an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Cell:
    protocol: str
    policy: str  # "-" for the full cache
    budget: str
    kv_budget: float | int | str | None  # what the requests sent ("entropy"; None: no compaction)
    n: int
    correct: int
    accuracy: float
    same_as_full: float  # share of prompts whose extracted answer equals the full cache's
    pair_kept: float | None  # streaming only: share of prompts whose queried pair stayed in the cache
    compactions: int
    tokens_held: int
    tokens_kept: int
    tokens_evicted: int
    blocks_freed: int
    refused: int
    scored: int  # compactions whose selection came from the policy's scores (the workers' count)
    degraded: int  # compactions of a scored policy that fell back to streaming
    preemptions: int  # requests vLLM preempted (recomputed from scratch) during the cell
    seconds: float
    answers: list[str | None] = dataclasses.field(repr=False)


def count_preemptions(scheduler: Any) -> None:
    """Count the scheduler's preemptions in `scheduler.kv_recall_preemptions` (this instance only)."""
    preempt = scheduler._preempt_request
    scheduler.kv_recall_preemptions = 0

    def counting(request: Any, *args: Any, **kwargs: Any) -> None:
        scheduler.kv_recall_preemptions += 1
        preempt(request, *args, **kwargs)

    scheduler._preempt_request = counting


def _counters(llm: Any, scheduler: Any) -> dict[str, int]:
    from vllm_adaptive.kvcache.worker import worker_snapshot

    workers = llm.collective_rpc(worker_snapshot)
    return {**scheduler.kv_snapshot(), "scored": sum(w["scored"] for w in workers),
            "degraded": sum(w["degraded"] for w in workers),
            "preemptions": scheduler.kv_recall_preemptions}


def queried_pair_index(ids: Sequence[int]) -> int | None:
    """Index of the haystack's `key=` token for the key the prompt (ending with `key=`) asks."""
    key = ids[-1]
    return next((i for i, t in enumerate(ids[:-1]) if t == key), None)


def streaming_keeps_pair(pair: int | None, physical: int, budget: int, sinks: int) -> bool:
    """Whether the first `sinks` and the most recent `budget - sinks` of `physical` tokens hold
    the pair's two tokens (its `key=` at `pair`, its value after it)."""
    if pair is None:
        return False
    if budget >= physical:
        return True
    sinks = min(sinks, budget)
    recent_start = physical - (budget - sinks)
    return all(i < sinks or i >= recent_start for i in (pair, pair + 1))


@dataclasses.dataclass
class Setup:
    examples: list[Example]
    prompt_ids: list[list[int]]
    answer_tokens: int


def prepare(tokenizer: Any, n: int, seed: int) -> Setup:
    examples = eval_examples("recall", seed, n)
    prompt_ids = [tokenizer.encode(e.prompt) for e in examples]
    answer_tokens = max(len(tokenizer.encode(e.completion, add_special_tokens=False)) for e in examples)
    return Setup(examples, prompt_ids, answer_tokens)


def run_cell(llm: Any, scheduler: Any, setup: Setup, protocol: str, policy: str, budget: Budget,
             full_answers: list[str | None] | None) -> Cell:
    tokenizer = llm.get_tokenizer()
    extra: dict[str, Any] = {} if budget.value is None else {"kv_budget": budget.value, "kv_policy": policy}
    if budget.multiplier is not None:
        extra["kv_entropy_multiplier"] = budget.multiplier
    requests, params = [], []
    for ids in setup.prompt_ids:
        request_extra = dict(extra)
        max_tokens = setup.answer_tokens
        if protocol == "key-after":
            request_extra[FORCE_KEY] = ids[-1]
            ids = ids[:-1]
            max_tokens += 1
        requests.append({"prompt_token_ids": ids})
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=request_extra or None))
    llm.reset_prefix_cache()  # results never depend on the cells before
    before = _counters(llm, scheduler)
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = _counters(llm, scheduler)
    delta = {k: after[k] - before[k] for k in after}
    correct, answers, kept = 0, [], 0
    rule = parse_request(extra, scheduler.kv_config) if extra else None
    for example, ids, request, output in zip(setup.examples, setup.prompt_ids, requests, outputs):
        completion = output.outputs[0]
        text = completion.text
        if protocol == "key-after":
            if list(completion.token_ids[:1]) != [ids[-1]]:
                raise RuntimeError(f"key-after: the first output token is {list(completion.token_ids[:1])}, "
                                   f"not the forced key {ids[-1]}")
            text = tokenizer.decode(list(completion.token_ids[1:]), skip_special_tokens=True)
        correct += recall.is_correct(example, text)
        answers.append(recall.extract_answer(text))
        if rule is not None and rule.rule != "entropy":
            physical = len(request["prompt_token_ids"])
            kept += streaming_keeps_pair(queried_pair_index(ids), physical, rule.target(physical), rule.sinks)
    n = len(setup.examples)
    same = sum(a == b for a, b in zip(answers, full_answers)) / n if full_answers is not None else 1.0
    pair_kept = kept / n if policy == "streaming" and budget.value != ENTROPY else (1.0 if rule is None else None)
    return Cell(protocol, policy if rule is not None else "-", budget.label, budget.value, n, correct, correct / n, same,
                pair_kept, delta["compactions"], delta["tokens_held"], delta["tokens_kept"],
                delta["tokens_evicted"], delta["blocks_freed"], delta["refused"], delta["scored"],
                delta["degraded"], delta["preemptions"], seconds, answers)


def open_engine(model_path: str, kv_cache_bytes: int, dtype: str, max_model_len: int) -> Any:
    """The in-process compacting engine (its scheduler readable from here)."""
    import vllm_adaptive
    from vllm import LLM

    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        kwargs = vllm_adaptive.engine_kwargs(
            {"kvcache": {"enabled": True}}, logits_processors=[ForceFirstToken],
            kv_cache_memory_bytes=kv_cache_bytes, dtype=dtype, max_model_len=max_model_len, seed=ENGINE_SEED)
        return LLM(model_path, **kwargs)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous


@dataclasses.dataclass(frozen=True)
class Report:
    meta: dict[str, Any]
    cells: list[Cell]


def run_benchmark(model_path: str, *, n: int = DEFAULT_N, seed: int = EVAL_SEED,
                  policies: Sequence[str] = KV_POLICIES, budgets: Sequence[Budget] = (),
                  protocols: Sequence[str] = PROTOCOLS, kv_cache_bytes: int = KV_CACHE_BYTES,
                  dtype: str = "auto", command: str | None = None) -> Report:
    """Every (protocol, policy, budget) cell on one engine; the full cache once per protocol."""
    import vllm

    budgets = list(budgets) or [Budget.parse(b) for b in DEFAULT_BUDGETS]
    git = _git_state()  # the code the engine loads, before anyone edits it
    started = time.perf_counter()
    llm = open_engine(model_path, kv_cache_bytes, dtype, model_max_len(model_path, MAX_MODEL_LEN))
    startup = time.perf_counter() - started
    try:
        scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        if not hasattr(scheduler, "kv_snapshot"):
            raise RuntimeError(f"the engine runs {type(scheduler).__name__}, not the compacting scheduler")
        count_preemptions(scheduler)
        setup = prepare(llm.get_tokenizer(), n, seed)
        longest = max(map(len, setup.prompt_ids))
        if longest + setup.answer_tokens + 1 > llm.model_config.max_model_len:
            raise ValueError(f"a prompt of {longest} tokens does not fit max_model_len {llm.model_config.max_model_len}")
        # The first generate of an engine pays one-off costs; keep them out of the timed cells.
        llm.generate(["query: "], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
        cells: list[Cell] = []
        for protocol in protocols:
            full = run_cell(llm, scheduler, setup, protocol, "-", Budget(FULL, None), None)
            cells.append(full)
            _progress(full)
            for policy in policies:
                for budget in budgets:
                    if budget.value is not None:
                        cells.append(run_cell(llm, scheduler, setup, protocol, policy, budget, full.answers))
                        _progress(cells[-1])
        lengths = list(map(len, setup.prompt_ids))
        meta = {
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command,
            "model": model_path, "task": "recall", "seed": seed, "n": n,
            "prompt_tokens": {"min": min(lengths), "mean": sum(lengths) / len(lengths), "max": max(lengths)},
            "answer_tokens": setup.answer_tokens, "protocols": list(protocols), "policies": list(policies),
            "budgets": [b.label for b in budgets],
            "kvcache": dataclasses.asdict(scheduler.kv_config),
            "engine": {"dtype": str(llm.model_config.dtype).removeprefix("torch."),
                       "max_model_len": llm.model_config.max_model_len, "kv_cache_memory_bytes": kv_cache_bytes,
                       "block_size": llm.llm_engine.vllm_config.cache_config.block_size,
                       "seed": ENGINE_SEED, "temperature": 0.0, "startup_seconds": round(startup, 1)},
            "vllm_version": vllm.__version__,
            "git": git,
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return Report(meta, cells)


def _progress(cell: Cell) -> None:
    print(f"kv_recall: {cell.protocol} {cell.policy} {cell.budget}: accuracy {cell.accuracy:.2f}, "
          f"{cell.tokens_evicted} tokens evicted, {cell.degraded} degraded, {cell.preemptions} preempted, "
          f"{cell.seconds:.0f} s",
          file=sys.stderr, flush=True)


def _git_state() -> dict[str, Any] | None:
    """The commit and whether the plugin's code differs from it (None outside a checkout)."""
    import vllm_adaptive

    root = Path(vllm_adaptive.__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vllm_adaptive", "patches", "kernels"],
                               cwd=root, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "plugin_modified": bool(dirty.stdout.strip())}


TABLE_COLUMNS = ("protocol", "policy", "budget", "kept / request", "accuracy", "same answer as full",
                 "pair kept (streaming)", "tokens evicted", "blocks freed", "degraded", "preemptions", "seconds")


def format_table(cells: Sequence[Cell]) -> str:
    def row(c: Cell) -> list[str]:
        kept = f"{c.tokens_kept / c.compactions:.0f}" if c.compactions else "-"
        pair = "-" if c.pair_kept is None else f"{c.pair_kept:.2f}"
        return [c.protocol, c.policy, c.budget, kept, f"{c.accuracy:.2f}", f"{c.same_as_full:.2f}", pair,
                str(c.tokens_evicted), str(c.blocks_freed), str(c.degraded), str(c.preemptions),
                f"{c.seconds:.0f}"]

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "--:" for i in range(len(TABLE_COLUMNS))) + "|"]
    lines += ["| " + " | ".join(row(c)) + " |" for c in cells]
    return "\n".join(lines)


def plot(cells: Sequence[Cell], path: Path) -> bool:
    """Accuracy against the budget share, a line per (protocol, policy); False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    protocols = list(dict.fromkeys(c.protocol for c in cells))
    for i, protocol in enumerate(protocols):
        style = "-" if i == 0 else "--"
        for c in cells:
            if c.protocol == protocol and c.policy == "-":
                ax.axhline(c.accuracy, color="gray", linestyle=style, linewidth=1, label=f"{protocol}: full cache")
        for policy in dict.fromkeys(c.policy for c in cells if c.policy != "-"):
            points = sorted((c.kv_budget, c.accuracy) for c in cells if c.protocol == protocol
                            and c.policy == policy and isinstance(c.kv_budget, float))
            if points:
                ax.plot(*zip(*points), "o" + style, label=f"{protocol}: {policy}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="KV budget (share of the prompt)", ylabel="recall accuracy", ylim=(-0.03, 1.03),
           title="recall vs KV budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": report.meta, "cells": [dataclasses.asdict(c) for c in report.cells]}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "table.md").write_text(format_table(report.cells) + "\n")


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_recall", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="target", help="a model folder, 'tiny' or a shipped model's name (default target)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="held-out recall examples")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out set seed")
    parser.add_argument("--policies", default=",".join(KV_POLICIES), help=f"comma-separated kv_policy values: {','.join(KV_POLICIES)}")
    parser.add_argument("--budgets", default=",".join(DEFAULT_BUDGETS),
                        help="comma-separated: full, shares of the prompt (1/8, 0.125), tokens (200), entropy or "
                             "entropy:M (kv_entropy_multiplier M); the full cache always runs")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma-separated: {','.join(PROTOCOLS)}")
    parser.add_argument("--kv-cache-bytes", type=int, default=KV_CACHE_BYTES)
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto: the model's, bfloat16 for the shipped models)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/kv-recall/<date-time>)")
    args = parser.parse_args(argv)
    args.policy_list = _list(args.policies)
    if bad := [p for p in args.policy_list if p not in KV_POLICIES]:
        parser.error(f"--policies: unknown {bad}; known: {list(KV_POLICIES)}")
    args.protocol_list = _list(args.protocols)
    if bad := [p for p in args.protocol_list if p not in PROTOCOLS] or not args.protocol_list:
        parser.error(f"--protocols: unknown {bad}; known: {list(PROTOCOLS)}")
    try:
        args.budget_list = [Budget.parse(b) for b in _list(args.budgets)]
        args.model_path = resolve_model(args.model).path
    except ValueError as error:
        parser.error(str(error))
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or Path("results") / "kv-recall" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = run_benchmark(args.model_path, n=args.n, seed=args.seed, policies=args.policy_list,
                           budgets=args.budget_list, protocols=args.protocol_list,
                           kv_cache_bytes=args.kv_cache_bytes, dtype=args.dtype,
                           command=" ".join(["python -m benchmarks.kv_recall", *sys.argv[1:]]))
    write_report(report, out)
    plotted = plot(report.cells, out / "accuracy.png")
    print(format_table(report.cells))
    print(f"\nwritten to {out}/ (table.md, results.json{', accuracy.png' if plotted else ''})", file=sys.stderr)


if __name__ == "__main__":
    main()
