"""What our samplers add to vLLM's sampling step, measured on vLLM's own V1 `Sampler`, on CPU.

`python -m benchmarks.sampler_overhead` times, for every registered adaptive sampler and every
(batch, vocab) of the grid, two versions of one sampling step:

- vLLM's step: `vllm.v1.sample.sampler.Sampler` on float32 logits with the `SamplingMetadata`
  the V1 input batch builds for random-sampling requests (temperature only, no top-k/top-p, no
  penalties), with vLLM's built-in logits processors (min_tokens, logit_bias, min_p) loaded;
- the same step with `AdaptiveLogitsProcessor` loaded as well (built through its V1
  constructor, fed through `update_state` with a `BatchUpdateBuilder` as the input batch does)
  and every row a request that asked for the sampler.

Between steps each request's output list grows by the token just sampled, so per-step state
(Mirostat's mu) is updated as in the engine. The two versions alternate (A B B A ...) on the
same logits, copied into the step's buffer outside the timed region (the step works in place).
Reported per row: medians of each version, the added time (median of the paired differences),
and its ratio to vLLM's step. Results go to stdout (Markdown) and to `--out` (CSV + Markdown).

The Markdown also says, where the run measured batch 256 x vocabulary 131072, how each
threshold sampler (Mirostat v2, epsilon, eta, top-n-sigma) and `typical` compare with issue #17's
targets for the added time: at most 1.3 and 5 vLLM sampling steps.

Mirostat's memory per step (`--memory`, on by default for the Mirostat samplers in the run):
for each Mirostat sampler, batch and vocabulary of the grid, the processor's `apply` runs inside
vLLM's step under torch's memory profiler for a few steps; reported are the bytes it allocates
that are still alive when it returns (what a step keeps), the peak of its own allocations during
the call (temporaries), and the size of the logits tensor it refers to until the next step
(vLLM's own tensor, not a copy). Results: `mirostat_memory.csv` / `.md`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

DEFAULT_BATCH_SIZES = (1, 32, 256)
DEFAULT_VOCAB_SIZES = (32768, 131072)
TEMPERATURE = 0.8
SEED = 0

# Values that make a sampler truncate (its default may leave rows as they are, e.g.
# typical_p = 1 and epsilon = eta_cutoff = 0 are "off"). Only the keys a registered sampler
# declares are sent; everything else comes from the sampler's defaults.
TRUNCATING_VALUES: dict[str, float] = {
    "typical_p": 0.9,
    "epsilon": 3e-4,
    "eta_cutoff": 2e-3,
}
# Samplers that rescale the logits instead of removing tokens: keeping every token is right.
RESCALING_SAMPLERS = frozenset({"dynatemp", "edt"})

CSV_COLUMNS = (
    "sampler",
    "batch",
    "vocab",
    "base_ms",
    "with_ms",
    "added_ms",
    "added_iqr_ms",
    "ratio",
    "base_min_ms",
    "with_min_ms",
    "min_ratio",
    "kept_pct",
    "pairs",
    "status",
)


@dataclasses.dataclass(frozen=True)
class Result:
    sampler: str
    batch: int
    vocab: int
    base_ms: float  # median of vLLM's step alone
    with_ms: float  # median of the step with our processor
    added_ms: float  # median of the paired differences (with - base)
    added_iqr_ms: float  # interquartile range of those differences
    base_min_ms: float  # fastest step of each version: the least disturbed by other work
    with_min_ms: float
    kept_pct: float  # mean share of finite logits per row after our processor (last step)
    pairs: int
    status: str  # "ok", or why the figure does not measure the sampler

    @property
    def ratio(self) -> float:
        return self.added_ms / self.base_ms

    @property
    def min_ratio(self) -> float:
        return (self.with_min_ms - self.base_min_ms) / self.base_min_ms

    def csv_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["ratio"] = self.ratio
        row["min_ratio"] = self.min_ratio
        return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


# ---- the two sampling steps ---------------------------------------------------------------


def make_vllm_config(max_num_seqs: int) -> Any:
    """A VllmConfig with the plugin on (default settings) and room for `max_num_seqs` rows."""
    from vllm.config import VllmConfig

    config = VllmConfig(additional_config={"adaptive": {}})
    # min_p's buffers are sized by max_num_seqs (default 128); the grid goes to 256.
    config.scheduler_config.max_num_seqs = max(max_num_seqs, config.scheduler_config.max_num_seqs)
    return config


def sampler_extra_args(name: str) -> dict[str, Any]:
    """`extra_args` of a request asking for sampler `name`, with truncating values it accepts."""
    from vllm_adaptive.sampling.params import SAMPLER_KEY, SAMPLERS

    keys = {param.key for param in SAMPLERS[name]}
    return {SAMPLER_KEY: name, **{k: v for k, v in TRUNCATING_VALUES.items() if k in keys}}


class SamplingStep:
    """One persistent batch of `batch` random-sampling requests, as vLLM's V1 input batch keeps it.

    With `extra_args` the batch also loads `AdaptiveLogitsProcessor` and every request carries
    those arguments; without, it is plain vLLM.
    """

    def __init__(self, vllm_config: Any, batch: int, extra_args: dict[str, Any] | None) -> None:
        from vllm import SamplingParams
        from vllm.v1.sample.logits_processor import BUILTIN_LOGITS_PROCESSORS, LogitsProcessors
        from vllm.v1.sample.logits_processor.state import BatchUpdateBuilder
        from vllm.v1.sample.metadata import SamplingMetadata
        from vllm.v1.sample.sampler import Sampler

        device, pin_memory = torch.device("cpu"), False
        classes: list[type] = list(BUILTIN_LOGITS_PROCESSORS)
        self.adaptive = None
        if extra_args is not None:
            from vllm_adaptive.sampling.processor import AdaptiveLogitsProcessor

            classes.append(AdaptiveLogitsProcessor)
        processors = [cls(vllm_config, device, pin_memory) for cls in classes]
        if extra_args is not None:
            self.adaptive = processors[-1]
        self.logitsprocs = LogitsProcessors(processors)
        self.sampler = Sampler()

        # The runner keeps each request's SamplingParams and its live output-token list.
        self.params = [
            SamplingParams(
                temperature=TEMPERATURE, extra_args=dict(extra_args) if extra_args else None
            )
            for _ in range(batch)
        ]
        self.output_ids: list[list[int]] = [[] for _ in range(batch)]
        builder = BatchUpdateBuilder()
        for index in range(batch):
            builder.added.append((index, self.params[index], [1, 2, 3], self.output_ids[index]))
        self.update_state(builder.get_and_reset(batch))

        zeros = torch.zeros(batch, dtype=torch.float32)
        self.metadata = SamplingMetadata(
            temperature=torch.full((batch,), TEMPERATURE, dtype=torch.float32),
            all_greedy=False,
            all_random=True,
            top_p=None,
            top_k=None,
            generators={},
            max_num_logprobs=None,
            no_penalties=True,
            prompt_token_ids=None,
            frequency_penalties=zeros,
            presence_penalties=zeros,
            repetition_penalties=torch.ones(batch, dtype=torch.float32),
            # The input batch passes the live lists when custom processors are loaded.
            output_token_ids=self.output_ids if extra_args is not None else [],
            allowed_token_ids_mask=None,
            bad_words_token_ids={},
            logitsprocs=self.logitsprocs,
            spec_token_ids=[[] for _ in range(batch)],
        )

    def update_state(self, batch_update: Any) -> None:
        for processor in self.logitsprocs.all:
            processor.update_state(batch_update)

    def run(self, logits: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One timed sampling step on `logits` (modified in place); seconds and sampled ids."""
        start = time.perf_counter()
        output = self.sampler(logits, self.metadata)
        elapsed = time.perf_counter() - start
        return elapsed, output.sampled_token_ids

    def advance(self, sampled: torch.Tensor) -> None:
        """What the runner does between steps: append the sampled tokens, refresh processors."""
        for ids, token in zip(self.output_ids, sampled.view(-1).tolist()):
            ids.append(token)
        self.update_state(None)

    def failures(self) -> int:
        return int(getattr(self.adaptive, "failures", 0)) if self.adaptive is not None else 0


class _KeptShare:
    """Wraps a logits processor for one untimed step and records the share of finite logits."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.kept_pct = math.nan

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        out = self.inner.apply(logits)
        self.kept_pct = 100.0 * torch.isfinite(out).double().mean().item()
        return out


def kept_share(step: SamplingStep, source: torch.Tensor, work: torch.Tensor) -> float:
    """Percentage of logits our processor leaves finite, measured on one extra (untimed) step."""
    invariant = step.logitsprocs.argmax_invariant
    index = next(i for i, p in enumerate(invariant) if p is step.adaptive)
    probe = _KeptShare(step.adaptive)
    invariant[index] = probe  # type: ignore[call-overload]
    try:
        work.copy_(source)
        _, sampled = step.run(work)
    finally:
        invariant[index] = step.adaptive
    step.advance(sampled)
    return probe.kept_pct


def make_logits(batch: int, vocab: int, seed: int = SEED) -> torch.Tensor:
    """Float32 logits [batch, vocab]: N(0, 3^2), every second row peaked (4 tokens + 10)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=generator) * 3.0
    peaked = torch.arange(1, batch, 2)
    if len(peaked):
        tokens = torch.randint(0, vocab, (len(peaked), min(4, vocab)), generator=generator)
        logits[peaked.unsqueeze(-1), tokens] += 10.0
    return logits


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(
    vllm_config: Any,
    sampler: str,
    batch: int,
    vocab: int,
    *,
    warmup: int,
    repeats: int,
    min_seconds: float,
) -> Result:
    source = make_logits(batch, vocab)
    work = torch.empty_like(source)
    base = SamplingStep(vllm_config, batch, None)
    ours = SamplingStep(vllm_config, batch, sampler_extra_args(sampler))

    def one(step: SamplingStep) -> float:
        work.copy_(source)  # outside the timed region: the step works in place
        elapsed, sampled = step.run(work)
        step.advance(sampled)
        return elapsed

    for _ in range(warmup):
        one(base)
        one(ours)
    base_s: list[float] = []
    with_s: list[float] = []
    started = time.perf_counter()
    while len(base_s) < repeats or time.perf_counter() - started < min_seconds:
        if len(base_s) % 2 == 0:  # A B, then B A: neither version always runs second
            base_s.append(one(base))
            with_s.append(one(ours))
        else:
            with_s.append(one(ours))
            base_s.append(one(base))
    kept = kept_share(ours, source, work)

    failures = ours.failures()
    status = "ok"
    if failures:
        status = f"processor failed {failures}x (rows fell back to plain sampling)"
    elif not kept < 100.0 and sampler not in RESCALING_SAMPLERS:
        status = "nothing truncated"
    added = [w - b for w, b in zip(with_s, base_s)]
    return Result(
        sampler=sampler,
        batch=batch,
        vocab=vocab,
        base_ms=1e3 * statistics.median(base_s),
        with_ms=1e3 * statistics.median(with_s),
        added_ms=1e3 * statistics.median(added),
        added_iqr_ms=1e3 * (_quantile(added, 0.75) - _quantile(added, 0.25)),
        base_min_ms=1e3 * min(base_s),
        with_min_ms=1e3 * min(with_s),
        kept_pct=kept,
        pairs=len(base_s),
        status=status,
    )



# ---- Mirostat's memory per step ----------------------------------------------------------------

MEMORY_COLUMNS = (
    "sampler", "batch", "vocab", "kept_bytes", "peak_bytes", "held_logits_bytes", "steps"
)


@dataclasses.dataclass(frozen=True)
class MemoryResult:
    sampler: str
    batch: int
    vocab: int
    kept_bytes: int  # allocated by the processor's apply, alive after it returned (max of steps)
    peak_bytes: int  # the highest its own allocations reached during one apply
    held_logits_bytes: int  # vLLM's logits tensor the processor refers to until the next step
    steps: int

    def csv_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _MemoryProbe:
    """Wraps the processor for some steps and records what its `apply` allocates."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.kept = 0
        self.peak = 0

    def __getattr__(self, name: str) -> Any:  # update_state etc.: the processor's own
        return getattr(self.inner, name)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
            out = self.inner.apply(logits)
        # Each op's own allocations net of its own frees, and frees outside any op ("[memory]"),
        # in the order they happened.
        running = peak = 0
        for event in sorted(prof.events(), key=lambda e: e.time_range.start):
            running += event.self_cpu_memory_usage
            peak = max(peak, running)
        self.kept = max(self.kept, running)
        self.peak = max(self.peak, peak)
        return out


def measure_memory(
    vllm_config: Any, sampler: str, batch: int, vocab: int, steps: int = 3
) -> MemoryResult:
    source = make_logits(batch, vocab)
    work = torch.empty_like(source)
    step = SamplingStep(vllm_config, batch, sampler_extra_args(sampler))
    invariant = step.logitsprocs.argmax_invariant
    index = next(i for i, p in enumerate(invariant) if p is step.adaptive)
    probe = _MemoryProbe(step.adaptive)
    invariant[index] = probe  # type: ignore[call-overload]
    try:
        for _ in range(steps):  # the first step has no token to update from; later ones do
            work.copy_(source)
            _, sampled = step.run(work)
            step.advance(sampled)
    finally:
        invariant[index] = step.adaptive
    held = getattr(step.adaptive, "_held", None)
    held_bytes = held.untyped_storage().nbytes() if isinstance(held, torch.Tensor) else 0
    return MemoryResult(sampler, batch, vocab, probe.kept, probe.peak, held_bytes, steps)


def memory_markdown(results: Sequence[MemoryResult]) -> str:
    lines = [
        "# Mirostat's memory per step (the processor's own allocations, CPU)",
        "",
        "| sampler | batch | vocab | kept after a step (bytes) | peak during a step (MiB) "
        "| vLLM logits referred to (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.sampler} | {r.batch} | {r.vocab} | {r.kept_bytes} | {r.peak_bytes / 2**20:.3f} "
            f"| {r.held_logits_bytes / 2**20:.1f} |"
        )
    return "\n".join(lines) + "\n"


def write_memory(out: Path, results: Sequence[MemoryResult], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "mirostat_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MEMORY_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow(r.csv_row())
    (out / "mirostat_memory.md").write_text(table)


# ---- report ---------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, str]:
    import vllm

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model,
        "cpus": f"{os.cpu_count()} ({usable} usable by this process)",
        "torch threads": str(threads),
        "torch": torch.__version__,
        "vllm": getattr(vllm, "__version__", "?"),
        "python": platform.python_version(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


THRESHOLD_SAMPLERS = ("mirostat_v2", "epsilon", "eta", "top_n_sigma")
# Issue #17: added time / vLLM's sampling step at batch 256 x vocabulary 131072 on CPU.
TARGETS: dict[str, float] = {**{name: 1.3 for name in THRESHOLD_SAMPLERS}, "typical": 5.0}
TARGET_SIZE = (256, 131072)


def target_lines(results: Sequence[Result]) -> list[str]:
    """Bullets (not a table) comparing the measured rows of TARGET_SIZE with TARGETS."""
    batch, vocab = TARGET_SIZE
    lines = [f"Issue #17 targets (added / vLLM step at batch {batch} x vocab {vocab}):", ""]
    measured = [r for r in results if (r.batch, r.vocab) == TARGET_SIZE and r.sampler in TARGETS]
    for r in measured:
        target = TARGETS[r.sampler]
        verdict = "met" if r.ratio <= target else "missed"
        lines.append(
            f"- {r.sampler}: {r.ratio:.2f} (target at most {target}; min-based {r.min_ratio:.2f}; "
            f"the step with it takes {r.with_ms / r.base_ms:.2f}x vLLM's): {verdict}"
        )
    if not measured:
        lines.append(f"- not measured: this run has no row at batch {batch} x vocab {vocab}")
    return lines


def markdown(results: Sequence[Result], info: dict[str, str], command: str) -> str:
    lines = [
        "# Sampler overhead on vLLM's V1 sampling step (CPU)",
        "",
        f"Command: `{command}`",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
        "| sampler | batch | vocab | vLLM step (ms) | with sampler (ms) | added (ms) "
        "| added / vLLM step | min-based ratio | kept % | pairs | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.sampler} | {r.batch} | {r.vocab} | {r.base_ms:.3f} | {r.with_ms:.3f} "
            f"| {r.added_ms:.3f} | {r.ratio:.2f} | {r.min_ratio:.2f} | {r.kept_pct:.2f} "
            f"| {r.pairs} | {r.status} |"
        )
    lines += ["", *target_lines(results)]
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: Sequence[Result], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sampler_overhead.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow(r.csv_row())
    (out / "sampler_overhead.md").write_text(table)


# ---- command line ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sampler_overhead",
        description="Time added by each adaptive sampler to vLLM's V1 sampling step, on CPU.",
    )
    parser.add_argument(
        "--samplers", help="comma-separated sampler names (default: every registered one)"
    )
    parser.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--vocab-sizes", type=_int_list, default=list(DEFAULT_VOCAB_SIZES))
    parser.add_argument("--repeats", type=int, default=10, help="minimum timed pairs per row (10)")
    parser.add_argument(
        "--min-seconds", type=float, default=1.0,
        help="keep timing pairs until this much time has passed, for short steps (1.0)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed pairs first (2)")
    parser.add_argument(
        "--threads", type=int, help="torch.set_num_threads (default: torch's default)"
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default results/sampler_overhead/<time>)"
    )
    parser.add_argument(
        "--memory", action=argparse.BooleanOptionalAction, default=True,
        help="also measure Mirostat's memory per step for the Mirostat samplers in the run (on)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.min_seconds < 0:
        parser.error("--repeats must be >= 1, --warmup and --min-seconds >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from vllm_adaptive.sampling.params import SAMPLERS

    if args.samplers:
        samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
        unknown = [s for s in samplers if s not in SAMPLERS]
        if unknown:
            print(f"unknown sampler(s) {unknown}; registered: {sorted(SAMPLERS)}", file=sys.stderr)
            return 2
    else:
        samplers = list(SAMPLERS)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    out = args.out or Path("results") / "sampler_overhead" / datetime.datetime.now().strftime(
        "%Y%m%d-%H%M%S"
    )
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.sampler_overhead", *given])

    vllm_config = make_vllm_config(max(args.batch_sizes))
    info = machine_info(threads)
    print(f"torch threads: {threads}; samplers: {', '.join(samplers)}", file=sys.stderr)
    results: list[Result] = []
    for sampler in samplers:
        for batch in args.batch_sizes:
            for vocab in args.vocab_sizes:
                result = measure(
                    vllm_config, sampler, batch, vocab,
                    warmup=args.warmup, repeats=args.repeats, min_seconds=args.min_seconds,
                )
                print(
                    f"  {sampler:>12} batch {batch:>4} vocab {vocab:>6}: "
                    f"vLLM {result.base_ms:8.3f} ms, "
                    f"added {result.added_ms:8.3f} ms ({result.ratio:.2f}x; min-based "
                    f"{result.min_ratio:.2f}x), {result.status}",
                    file=sys.stderr,
                )
                results.append(result)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = markdown(results, info, command)
    write_results(out, results, table)
    print(table)
    print(f"wrote {out / 'sampler_overhead.csv'}, {out / 'sampler_overhead.md'}", file=sys.stderr)
    stateful = [s for s in samplers if s.startswith("mirostat")]
    if args.memory and stateful:
        memory = [
            measure_memory(vllm_config, sampler, batch, vocab)
            for sampler in stateful for batch in args.batch_sizes for vocab in args.vocab_sizes
        ]
        memory_table = memory_markdown(memory)
        write_memory(out, memory, memory_table)
        print(memory_table)
        print(f"wrote {out / 'mirostat_memory.csv'}, {out / 'mirostat_memory.md'}", file=sys.stderr)
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
