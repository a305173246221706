"""Quality and speed of the project's models on the held-out task sets, measured in vLLM itself.

    python -m benchmarks.evaluate --models draft=PATH target=PATH --tasks arith,recall --n 100

For every model and configuration, one offline `LLM` engine is started, runs each task's
held-out examples (benchmarks.tasks.mixture.eval_examples) greedily (temperature 0) in one
`generate` call per task, and is shut down before the next starts. The generated text is scored
by the task (`is_correct`: exact match of the extracted answer for arith and recall,
grammaticality of the first sentence for text), and speed is generated tokens / wall time of the
`generate` call (all examples batched) and, for the first `--batch1` examples run one at a time,
at batch 1. The table is printed and written with everything needed to reproduce it to
`--out` (default results/eval/<date-time>/): results.json, results.csv, predictions.jsonl.

Rows are (model, configuration, task). A configuration is a named way of running a model: extra
engine arguments and extra sampling arguments (speculation, model switching and KV budgets come
as configurations; `baseline` is plain vLLM). Accuracy is deterministic for a given seed; tokens/s
is a measurement and varies between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.tasks.mixture import EVAL_SEED, Example, eval_examples, task_module

DEFAULT_TASKS = ("arith", "recall")
DEFAULT_N = 100
DEFAULT_BATCH1 = 4
# Enough for each task's longest worked completion (arith with 4 operations is ~80 tokens).
DEFAULT_MAX_TOKENS = {"arith": 128, "recall": 8, "text": 64}
KV_CACHE_BYTES = 1 << 30  # on CPU, vLLM's default reserves 92% of host RAM for the KV cache
MAX_MODEL_LEN = 4096  # recall prompts are ~1500 tokens by default
ENGINE_SEED = 0


@dataclasses.dataclass(frozen=True)
class Model:
    label: str
    path: str


@dataclasses.dataclass(frozen=True)
class Configuration:
    """A named way of running a model: extra `LLM(...)` and `SamplingParams(...)` arguments."""

    name: str
    engine_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sampling_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


CONFIGURATIONS: dict[str, Configuration] = {
    "baseline": Configuration("baseline"),
}


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """One table row: a model in a configuration on one task."""

    model: str
    configuration: str
    task: str
    n: int
    correct: int
    accuracy: float
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float
    # Speed of one request alone: the first `batch1` examples run one `generate` call each,
    # generated tokens / summed wall time (prefill included). 0.0 when not measured.
    batch1_tokens_per_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Prediction:
    model: str
    configuration: str
    task: str
    index: int
    answer: str
    extracted: str | None
    correct: bool
    generated_tokens: int
    output: str


@dataclasses.dataclass(frozen=True)
class Report:
    meta: dict[str, Any]
    results: list[TaskResult]
    predictions: list[Prediction]


def resolve_model(spec: str) -> Model:
    """`[LABEL=]TARGET`: TARGET is a model folder, `tiny` (the random-weight plumbing model) or a
    shipped trained model's name (`draft`, `target`: models/adaptive-*, checked against their
    manifests)."""
    from benchmarks.models import shipped

    label, sep, target = spec.partition("=")
    if not sep:
        label, target = "", spec
    if target == "tiny":
        from benchmarks.models.tiny import ensure_tiny_llama

        return Model(label or "tiny", str(ensure_tiny_llama()))
    path = Path(target).expanduser()
    if (path / "config.json").is_file():
        return Model(label or path.name, str(path))
    if target in shipped.ROLES:
        return Model(label or target, str(shipped.verified(target)))
    raise ValueError(f"model {target!r}: not a model folder (no config.json); names: {['tiny', *shipped.ROLES]}")


def model_max_len(path: str, cap: int = MAX_MODEL_LEN) -> int:
    """The engine's max_model_len: `cap`, or less when the model's positions are fewer."""
    config = json.loads((Path(path) / "config.json").read_text())
    return min(cap, int(config.get("max_position_embeddings", cap)))


def engine_kwargs(configuration: Configuration, *, max_model_len: int, kv_cache_bytes: int = KV_CACHE_BYTES,
                  seed: int = ENGINE_SEED, dtype: str = "auto") -> dict[str, Any]:
    kwargs: dict[str, Any] = {"kv_cache_memory_bytes": kv_cache_bytes, "max_model_len": max_model_len,
                              "seed": seed, "dtype": dtype}
    kwargs.update(configuration.engine_kwargs)
    return kwargs


@contextlib.contextmanager
def open_engine(model: Model, configuration: Configuration, **kwargs: Any) -> Iterator[Any]:
    """An offline `LLM` for `model` in `configuration`, shut down (engine processes included)
    on exit so the next engine starts with the memory free."""
    from vllm import LLM

    llm = LLM(model.path, **engine_kwargs(configuration, max_model_len=model_max_len(model.path), **kwargs))
    try:
        yield llm
    finally:
        # vLLM 0.32 has no LLM.shutdown(); the engine core client owns the engine processes.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def evaluate_on_engine(
    llm: Any,
    model_label: str,
    configuration: Configuration,
    examples: Mapping[str, Sequence[Example]],
    max_tokens: Mapping[str, int],
    batch1: int = 0,
) -> tuple[list[TaskResult], list[Prediction]]:
    """Run each task's examples through `llm` (greedy) and score them; one `generate` per task,
    then the first `batch1` examples one at a time for the batch-1 speed."""
    from vllm import SamplingParams

    max_len = llm.model_config.max_model_len
    tokenizer = llm.get_tokenizer()
    # The first generate of an engine pays one-off costs; keep them out of the timed calls. Then
    # start from an empty prefix cache, so results never depend on what the engine ran before.
    llm.generate(["Q: 1+1\n"], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    llm.reset_prefix_cache()
    results, predictions = [], []
    for task, task_examples in examples.items():
        module = task_module(task)
        prompt_ids = [tokenizer.encode(e.prompt) for e in task_examples]
        longest = max(map(len, prompt_ids))
        if longest + max_tokens[task] > max_len:
            raise ValueError(f"{task}: a prompt of {longest} tokens + max_tokens {max_tokens[task]} exceeds "
                             f"max_model_len {max_len}; lower --max-tokens or use a model with more positions")
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens[task], **configuration.sampling_kwargs)
        start = time.perf_counter()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        generated = 0
        correct = 0
        for i, (example, output) in enumerate(zip(task_examples, outputs)):
            completion = output.outputs[0]
            ok = module.is_correct(example, completion.text)
            correct += ok
            generated += len(completion.token_ids)
            predictions.append(Prediction(model_label, configuration.name, task, i, example.answer,
                                          module.extract_answer(completion.text), ok,
                                          len(completion.token_ids), completion.text))
        n = len(task_examples)
        results.append(TaskResult(model_label, configuration.name, task, n, correct, correct / n,
                                  sum(map(len, prompt_ids)), generated, seconds,
                                  generated / seconds if seconds > 0 else 0.0,
                                  batch1_speed(llm, prompt_ids[:batch1], params)))
    return results, predictions


def batch1_speed(llm: Any, prompt_ids: Sequence[list[int]], params: Any) -> float:
    """Generated tokens / wall time with one request in the engine at a time (0.0 if none)."""
    tokens, seconds = 0, 0.0
    for ids in prompt_ids:
        llm.reset_prefix_cache()  # each request pays its own prefill, as a fresh request would
        start = time.perf_counter()
        (output,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        seconds += time.perf_counter() - start
        tokens += len(output.outputs[0].token_ids)
    return tokens / seconds if seconds > 0 else 0.0


def run_evaluation(
    models: Sequence[Model],
    tasks: Sequence[str] = DEFAULT_TASKS,
    n: int = DEFAULT_N,
    seed: int = EVAL_SEED,
    max_tokens: Mapping[str, int] | None = None,
    configurations: Sequence[Configuration] = (CONFIGURATIONS["baseline"],),
    kv_cache_bytes: int = KV_CACHE_BYTES,
    dtype: str = "auto",
    batch1: int = 0,
    engine_factory: Callable[..., contextlib.AbstractContextManager[Any]] | None = None,
) -> Report:
    """Every model in every configuration on every task, one engine at a time.

    `engine_factory(model, configuration, kv_cache_bytes=..., dtype=...)` opens the engine
    (default `open_engine`); tests pass one that hands out an engine they share."""
    import vllm

    engine_factory = engine_factory or open_engine

    max_tokens = {t: (max_tokens or {}).get(t, DEFAULT_MAX_TOKENS[t]) for t in tasks}
    examples = {t: eval_examples(t, seed, n) for t in tasks}
    results: list[TaskResult] = []
    predictions: list[Prediction] = []
    engines: list[dict[str, Any]] = []
    for model in models:
        for configuration in configurations:
            with engine_factory(model, configuration, kv_cache_bytes=kv_cache_bytes, dtype=dtype) as llm:
                engines.append({"model": model.label, "configuration": configuration.name,
                                "dtype": str(llm.model_config.dtype).removeprefix("torch."),
                                "max_model_len": llm.model_config.max_model_len})
                rows, preds = evaluate_on_engine(llm, model.label, configuration, examples, max_tokens, batch1)
            del llm  # the engine is shut down; drop the last reference before the next one starts
            results += rows
            predictions += preds
    meta = {
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seed": seed,
        "n": n,
        "batch1": batch1,
        "tasks": list(tasks),
        "max_tokens": max_tokens,
        "models": [dataclasses.asdict(m) for m in models],
        "configurations": [dataclasses.asdict(c) | {"engine_kwargs": dict(c.engine_kwargs),
                                                     "sampling_kwargs": dict(c.sampling_kwargs)}
                           for c in configurations],
        "engine": {"kv_cache_memory_bytes": kv_cache_bytes, "max_model_len_cap": MAX_MODEL_LEN,
                   "seed": ENGINE_SEED, "dtype": dtype, "temperature": 0.0},
        "engines": engines,
        "vllm_version": vllm.__version__,
    }
    return Report(meta, results, predictions)


TABLE_COLUMNS = ("model", "configuration", "task", "n", "accuracy", "tokens_per_s", "batch1_tokens_per_s",
                 "generated_tokens", "seconds")


def format_table(results: Sequence[TaskResult]) -> str:
    """A Markdown table, one row per (model, configuration, task)."""
    def cell(row: TaskResult, column: str) -> str:
        value = getattr(row, column)
        if column == "accuracy":
            return f"{value:.3f}"
        if column in ("tokens_per_s", "batch1_tokens_per_s"):
            return f"{value:.1f}"
        if column == "seconds":
            return f"{value:.2f}"
        return str(value)

    header = "| " + " | ".join(TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" if c in ("model", "configuration", "task") else "--:" for c in TABLE_COLUMNS) + "|"
    rows = ["| " + " | ".join(cell(r, c) for c in TABLE_COLUMNS) + " |" for r in results]
    return "\n".join([header, rule, *rows])


def write_report(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": report.meta, "results": [dataclasses.asdict(r) for r in report.results]}
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    fields = [f.name for f in dataclasses.fields(TaskResult)]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in report.results)
    with (out / "predictions.jsonl").open("w") as f:
        for p in report.predictions:
            f.write(json.dumps(dataclasses.asdict(p)) + "\n")


def _max_tokens_arg(value: str) -> dict[str, int]:
    """`64` (every task) or `arith=128,recall=8`."""
    try:
        if "=" not in value:
            return {t: int(value) for t in DEFAULT_MAX_TOKENS}
        pairs = (item.split("=", 1) for item in value.split(","))
        return {task.strip(): int(tokens) for task, tokens in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or TASK=N,..., got {value!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="[LABEL=]NAME_OR_PATH",
                        help="a model folder, 'tiny', or a trained model's name (draft, target); repeatable")
    parser.add_argument("--models", nargs="+", default=[], metavar="[LABEL=]NAME_OR_PATH",
                        help="several models, e.g. draft target, or small=PATH big=PATH (label: name or folder)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated: arith,recall,text")
    parser.add_argument("--configurations", default="baseline",
                        help=f"comma-separated configurations: {','.join(CONFIGURATIONS)}")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="held-out examples per task")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out set seed")
    parser.add_argument("--max-tokens", type=_max_tokens_arg, default=None, metavar="N|TASK=N,...",
                        help=f"generation limit (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--kv-cache-bytes", type=int, default=KV_CACHE_BYTES)
    parser.add_argument("--dtype", default="auto",
                        help="engine dtype (auto: vLLM's choice, bfloat16 on CPUs that have it; float32: as trained)")
    parser.add_argument("--batch1", type=int, default=DEFAULT_BATCH1, metavar="K",
                        help=f"also time the first K examples of each task one at a time (batch-1 tokens/s; 0: skip; "
                             f"default {DEFAULT_BATCH1})")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/eval/<date-time>)")
    args = parser.parse_args(argv)
    args.model_specs = args.model + args.models
    if not args.model_specs:
        parser.error("give at least one model with --model or --models")
    args.task_list = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.task_list if t not in DEFAULT_MAX_TOKENS]
    if unknown or not args.task_list:
        parser.error(f"--tasks: unknown {unknown or 'empty list'}; known tasks: {sorted(DEFAULT_MAX_TOKENS)}")
    names = [c.strip() for c in args.configurations.split(",") if c.strip()]
    if unknown := [c for c in names if c not in CONFIGURATIONS]:
        parser.error(f"--configurations: unknown {unknown}; known: {sorted(CONFIGURATIONS)}")
    args.configuration_list = [CONFIGURATIONS[c] for c in names]
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.batch1 < 0:
        parser.error(f"--batch1 must be >= 0, got {args.batch1}")
    if args.max_tokens and (bad := sorted(set(args.max_tokens) - set(DEFAULT_MAX_TOKENS))):
        parser.error(f"--max-tokens: unknown tasks {bad}")
    try:
        args.model_list = [resolve_model(spec) for spec in args.model_specs]
    except ValueError as error:
        parser.error(str(error))
    if len({m.label for m in args.model_list}) != len(args.model_list):
        parser.error(f"model labels must differ, got {[m.label for m in args.model_list]}; use LABEL=PATH")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or Path("results") / "eval" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    report = run_evaluation(args.model_list, args.task_list, args.n, args.seed, args.max_tokens,
                            args.configuration_list, args.kv_cache_bytes, args.dtype, args.batch1)
    write_report(report, out)
    print(format_table(report.results))
    print(f"\nseed {args.seed}, {args.n} examples per task; written to {out}/ "
          "(results.json, results.csv, predictions.jsonl)", file=sys.stderr)


if __name__ == "__main__":
    main()
