"""What the adaptive drafting policy itself costs per engine step, beside the target's step.

`python -m benchmarks.policy_cost` drives `DraftLengthPolicy` exactly as the adaptive proposer
does each engine step (`observe_verification` of the previous drafts, `begin`, `record` and
`should_end` per draft step, `finish`, `observe_step`), with the draft model's forward passes
replaced by precomputed draft logits, and times only the policy's calls. The logits are those of a
draft whose confidence varies from row to row and step to step (a random peak height per row
and step), so stop rules end drafts at different steps; verification accepts a random prefix of
each draft; requests finish at random (about one in 60 per step) and new ones take their rows,
so the per-request state follows batch changes as in the engine. The controller, when on, is fed
step times from the measured target step, so it is past its warm-up and runs its full decision.

Beside it, the target's step: by default a measured forward of the project's target shape
(`benchmarks.models.pair.TARGET`, random weights, float32: this CPU has no bfloat16 matmul) over
[batch, 1 + K] tokens in plain torch, without a KV cache: a stand-in for the engine's
verification step, not the engine's own time (vLLM's CPU kernels and per-step costs differ either
way). `--target-step-ms 1=7.5,32=20` gives engine figures instead (e.g. step times from
benchmarks.speculative); the issue's targets are about the engine's step.

`--clock cpu` times with this process's CPU time instead of the wall clock: on a machine
shared with other work (this benchmark runs niced), the wall clock mostly measures waiting for a
core; CPU time does not (use `--threads 1`, so no other thread's time and no spinning is counted).

`--math host,device` measures the policy's two ways of deciding (DraftLengthPolicy host_math):
numpy on the host (what a CPU engine runs) and torch ops (what a GPU engine runs, here on CPU
tensors), side by side in one run.

`--stop-rules ead` (or any list with `ead`) measures EAD's routing policy
(vllm_adaptive.routing.policy.RoutingPolicy) the same way: `commit` of the previous step's
verification, `begin`, per draft step the small model's entropy (from the draft logits) and the
machine's `record`, `finish`; every row a speculative-mode EAD request whose tau is the 70th
percentile of the synthetic entropies (so the large model owns about 30% of positions), K
`--ead-k`; `--math` picks the machine's numpy (host) or torch arrays.

Reported per (stop rule, controller, math, batch): the policy's median and p90 milliseconds per engine
step, the draft steps it ran, the target step, and the policy's share of it. Results go to
stdout (Markdown) and to `--out` (CSV + Markdown; default results/policy_cost/<time>).
The issue #17 targets: at most 0.15 ms per step at batch 1, at most 3% of the step at batch 32.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

DEFAULT_BATCH_SIZES = (1, 32, 128)
DEFAULT_STOP_RULES = ("specdec", "adaedl")
MAX_DRAFT_TOKENS = 8
SEED = 0
FINISH_PROBABILITY = 1 / 60  # per row and step: requests of ~150-200 tokens at ~3 tokens a step
# Issue #17's targets for the policy's cost per engine step.
TARGET_MS_AT_BATCH_1 = 0.15
TARGET_SHARE_AT_BATCH_32 = 0.03

MATHS = ("host", "device")
CSV_COLUMNS = ("stop_rule", "controller", "math", "batch", "policy_ms_median", "policy_ms_p90",
               "draft_steps_mean", "draft_length_mean", "target_step_ms", "target_source",
               "share", "status")


@dataclasses.dataclass(frozen=True)
class Result:
    stop_rule: str
    controller: bool
    math: str
    batch: int
    policy_ms_median: float
    policy_ms_p90: float
    draft_steps_mean: float
    draft_length_mean: float
    target_step_ms: float
    target_source: str

    @property
    def share(self) -> float:
        return self.policy_ms_median / self.target_step_ms

    @property
    def status(self) -> str:
        if self.batch == 1 and self.policy_ms_median > TARGET_MS_AT_BATCH_1:
            return f"over {TARGET_MS_AT_BATCH_1} ms"
        if self.batch == 32 and self.share > TARGET_SHARE_AT_BATCH_32:
            return f"over {TARGET_SHARE_AT_BATCH_32:.0%}"
        return "ok"

    def csv_row(self) -> dict[str, object]:
        row = dataclasses.asdict(self)
        row.update(share=self.share, status=self.status)
        return row


# ---- the target's step ----------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_target_step_ms(
    batch: int, tokens_per_row: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> float:
    """Median ms of a forward of the target's shape over [batch, tokens_per_row] tokens."""
    from benchmarks.models.llama import Llama
    from benchmarks.models.pair import TARGET

    torch.manual_seed(SEED)
    model = Llama(TARGET.shape).eval()
    ids = torch.randint(0, TARGET.shape.vocab_size, (batch, tokens_per_row))
    times = []
    with torch.inference_mode():
        model(ids)  # warm-up
        for _ in range(repeats):
            started = clock()
            model(ids)
            times.append(clock() - started)
    return statistics.median(times) * 1e3


# ---- the policy, driven as the proposer drives it --------------------------------------------


class SyntheticDraft:
    """Draft logits [B, V] per draft step: a peak of random height on a random token per row, so
    the draft's top probability (and entropy) varies by row and step."""

    def __init__(self, batch: int, vocab: int, pool: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(pool, batch, vocab, generator=generator)
        peaks = torch.rand(pool, batch, generator=generator) * 14.0
        tokens = torch.randint(0, vocab, (pool, batch), generator=generator)
        self.logits.scatter_(2, tokens.unsqueeze(2), peaks.unsqueeze(2) + 4.0)
        self.tokens = self.logits.argmax(dim=2)
        self.pool = pool
        self.index = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.index % self.pool
        self.index += 1
        return self.logits[i], self.tokens[i]


def run_policy(
    stop_rule: str, controller: bool, batch: int, vocab: int, steps: int, warmup: int,
    target_step_s: float, policy_class: type | None = None, clock: Callable[[], float] = time.perf_counter,
    math: str = "host",
) -> tuple[list[float], float, float]:
    """Per engine step seconds spent in the policy; mean draft steps run; mean draft length."""
    from vllm_adaptive.speculative.config import AdaptiveDraftConfig
    from vllm_adaptive.speculative.policy import DraftLengthPolicy

    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=MAX_DRAFT_TOKENS, stop_rule=stop_rule,
                                 controller=controller, controller_min_samples=4)
    policy = (policy_class or DraftLengthPolicy)(config, host_math=math == "host")
    rng = np.random.default_rng(SEED)
    draft_source = SyntheticDraft(batch, vocab, pool=64, seed=SEED)
    next_id = batch
    req_ids = [f"req-{i}" for i in range(batch)]
    decoding = [True] * batch
    drafts: list[list[int]] = [[] for _ in range(batch)]
    timings: list[float] = []
    steps_run: list[int] = []
    lengths: list[float] = []
    draft_step_s = target_step_s * 0.05  # only the controller's time model reads it
    for step in range(warmup + steps):
        # The scheduler's view of the previous step: verification accepted a random prefix.
        accepted = [int(rng.integers(0, len(d) + 1)) for d in drafts]
        started = clock()
        policy.observe_verification(req_ids, drafts, accepted)
        progress = policy.begin(req_ids, decoding, MAX_DRAFT_TOKENS)
        spent = clock() - started
        for _ in range(progress.k):
            logits, tokens = draft_source.next()  # the draft's forward pass: not the policy's
            started = clock()
            progress.record(logits, tokens, None)
            end = progress.should_end()
            spent += clock() - started
            if end:
                break
        passes = max(progress.steps, 1)
        num_tokens = batch + sum(len(d) for d in drafts)
        started = clock()
        drafts = policy.finish(progress, req_ids, decoding)
        policy.observe_step(batch, num_tokens, target_step_s * (num_tokens / batch) ** 0.25, passes,
                            draft_step_s * passes)
        spent += clock() - started
        if step >= warmup:
            timings.append(spent)
            steps_run.append(progress.steps)
            lengths.append(sum(len(d) for d in drafts) / batch)
        # Requests that finished leave; new ones take their rows (no draft to verify yet).
        for row in np.flatnonzero(rng.random(batch) < FINISH_PROBABILITY).tolist():
            req_ids[row] = f"req-{next_id}"
            next_id += 1
            drafts[row] = []
    return timings, statistics.fmean(steps_run), statistics.fmean(lengths)


def run_routing(
    batch: int, vocab: int, steps: int, warmup: int, k: int, clock: Callable[[], float] = time.perf_counter,
    math: str = "host",
) -> tuple[list[float], float, float]:
    """Per engine step seconds spent in EAD's routing policy; mean draft steps; mean draft length."""
    from vllm_adaptive.routing.config import RoutingConfig
    from vllm_adaptive.routing.params import RequestRouting
    from vllm_adaptive.routing.policy import EmittedRow, RoutingPolicy, entropy_bits

    policy = RoutingPolicy(RoutingConfig(enabled=True), k, host_math=math == "host")
    rng = np.random.default_rng(SEED)
    draft_source = SyntheticDraft(batch, vocab, pool=64, seed=SEED)
    tau = float(np.quantile(entropy_bits(draft_source.logits.reshape(-1, vocab)).numpy(), 0.7))
    routing = RequestRouting(tau=tau, window=5, min_stint=0, mode="speculative")
    next_id = batch
    req_ids = [f"req-{i}" for i in range(batch)]
    decoding = np.ones(batch, dtype=bool)
    emitted: list[EmittedRow | None] = [None] * batch
    timings: list[float] = []
    steps_run: list[int] = []
    lengths: list[float] = []
    for step in range(warmup + steps):
        started = clock()
        policy.commit(req_ids, emitted)
        draft = policy.begin(req_ids, [routing] * batch, decoding)
        assert draft is not None
        spent = clock() - started
        for _ in range(k):
            logits, tokens = draft_source.next()  # the draft's forward pass: not the policy's
            started = clock()
            draft.record(logits, tokens, None, draft.entropy(logits))
            end = draft.should_end()
            spent += clock() - started
            if end:
                break
        started = clock()
        drafts, plan = policy.finish(draft)
        spent += clock() - started
        if step >= warmup:
            timings.append(spent)
            steps_run.append(draft.steps)
            lengths.append(sum(len(d) for d in drafts) / batch)
        # Verification: forced positions accepted, then a random prefix of the verified ones.
        emitted = []
        for req_id, row_draft in zip(req_ids, drafts):
            row_plan = plan.rows.get(req_id)
            forced = list(row_plan.forced) if row_plan else [False] * len(row_draft)
            dropped = bool(row_plan and row_plan.drop_bonus)
            count = int(rng.integers(1, len(row_draft) + 2))
            if dropped:
                count = min(count, len(row_draft))
            emitted.append(EmittedRow(None, max(count, 1), forced, 0, dropped, 10, None, 0, frozenset()))
        for row in np.flatnonzero(rng.random(batch) < FINISH_PROBABILITY).tolist():
            req_ids[row] = f"req-{next_id}"
            next_id += 1
            emitted[row] = None
        if step % 50 == 49:
            live = set(req_ids)
            policy.forget(lambda r: r in live)
    return timings, statistics.fmean(steps_run), statistics.fmean(lengths)


def measure(
    stop_rule: str, controller: bool, batch: int, vocab: int, steps: int, warmup: int,
    target_step_ms: float, target_source: str, clock: Callable[[], float] = time.perf_counter,
    math: str = "host", ead_k: int = 4,
) -> Result:
    if stop_rule == "ead":
        timings, steps_mean, length_mean = run_routing(batch, vocab, steps, warmup, ead_k, clock, math)
    else:
        timings, steps_mean, length_mean = run_policy(
            stop_rule, controller, batch, vocab, steps, warmup, target_step_ms / 1e3, clock=clock, math=math)
    ms = sorted(t * 1e3 for t in timings)
    return Result(
        stop_rule=stop_rule, controller=controller, math=math, batch=batch,
        policy_ms_median=statistics.median(ms), policy_ms_p90=ms[int(0.9 * (len(ms) - 1))],
        draft_steps_mean=steps_mean, draft_length_mean=length_mean,
        target_step_ms=target_step_ms, target_source=target_source,
    )


# ---- output ---------------------------------------------------------------------------------


def machine_info(threads: int) -> dict[str, str]:
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": f"{os.cpu_count()}",
        "torch threads": str(threads),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "niceness": str(os.nice(0)),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def markdown(results: Sequence[Result], info: dict[str, str], command: str) -> str:
    lines = [
        "# Adaptive drafting policy: cost per engine step beside the target's step (CPU)",
        "",
        f"Command: `{command}`",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
        f"Targets (issue #17): at most {TARGET_MS_AT_BATCH_1} ms per step at batch 1, at most "
        f"{TARGET_SHARE_AT_BATCH_32:.0%} of the step at batch 32.",
        "",
        "| stop rule | controller | math | batch | policy ms (median) | policy ms (p90) | draft steps "
        "| draft length | target step ms | target from | policy / step | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.stop_rule} | {'on' if r.controller else 'off'} | {r.math} | {r.batch} "
            f"| {r.policy_ms_median:.3f} | {r.policy_ms_p90:.3f} | {r.draft_steps_mean:.2f} "
            f"| {r.draft_length_mean:.2f} | {r.target_step_ms:.2f} | {r.target_source} "
            f"| {r.share:.2%} | {r.status} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: Sequence[Result], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "policy_cost.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow(r.csv_row())
    (out / "policy_cost.md").write_text(table)


# ---- command line ---------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _step_times(text: str) -> dict[int, float]:
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {int(b): float(ms) for b, ms in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected batch=milliseconds pairs, e.g. 1=7.5,32=20; got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.policy_cost",
        description="The adaptive drafting policy's own cost per engine step, beside the target's step.",
    )
    parser.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--stop-rules", default=",".join(DEFAULT_STOP_RULES),
                        help="comma-separated stop rules (none, entropy, adaedl, specdec), or ead: "
                             "EAD's routing policy")
    parser.add_argument("--ead-k", type=int, default=4, help="draft length of the ead rows")
    parser.add_argument("--steps", type=int, default=300, help="timed engine steps per cell")
    parser.add_argument("--warmup", type=int, default=30, help="untimed engine steps first")
    parser.add_argument("--vocab", type=int, default=None, help="draft vocabulary (default: the pair's)")
    parser.add_argument("--target-step-ms", type=_step_times, default=None,
                        help="batch=ms pairs from the engine instead of the measured target forward")
    parser.add_argument("--target-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--math", default=",".join(MATHS),
                        help="comma-separated: host (numpy decisions, the CPU path), device (torch ops)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall clock (an idle machine) or this process's CPU time (a busy one)")
    parser.add_argument("--out", type=Path, help="results folder (default results/policy_cost/<time>)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
    args.math = [m.strip() for m in args.math.split(",") if m.strip()]
    if not args.math or any(m not in MATHS for m in args.math):
        parser.error(f"--math must list some of {list(MATHS)}, got {args.math}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.models.pair import TARGET
    from vllm_adaptive.speculative.config import STOP_RULES

    stop_rules = [s.strip() for s in args.stop_rules.split(",") if s.strip()]
    unknown = [s for s in stop_rules if s not in (*STOP_RULES, "ead")]
    if unknown:
        print(f"unknown stop rule(s) {unknown}; known: {list(STOP_RULES)}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    vocab = args.vocab or TARGET.shape.vocab_size
    out = args.out or Path("results") / "policy_cost" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.policy_cost", *given])
    info = machine_info(torch.get_num_threads())
    info["clock"] = args.clock

    target_ms: dict[int, tuple[float, str]] = {}
    tokens_per_row = 1 + min(4, MAX_DRAFT_TOKENS)  # the controller's initial K
    for batch in args.batch_sizes:
        if args.target_step_ms and batch in args.target_step_ms:
            target_ms[batch] = (args.target_step_ms[batch], "given")
        else:
            ms = measure_target_step_ms(batch, tokens_per_row, args.target_repeats, clock)
            target_ms[batch] = (ms, f"forward [{batch}, {tokens_per_row}]")
        print(f"  target step at batch {batch}: {target_ms[batch][0]:.2f} ms ({target_ms[batch][1]})",
              file=sys.stderr)

    results = []
    for stop_rule in stop_rules:
        for controller in (False,) if stop_rule == "ead" else (False, True):
            for math in args.math:
                for batch in args.batch_sizes:
                    ms, source = target_ms[batch]
                    result = measure(stop_rule, controller, batch, vocab, args.steps, args.warmup, ms,
                                     source, clock, math, args.ead_k)
                    print(f"  {stop_rule:>8} controller {'on ' if controller else 'off'} {math:>6} "
                          f"batch {batch:>4}: {result.policy_ms_median:.3f} ms/step "
                          f"({result.share:.2%} of {ms:.2f} ms), {result.status}", file=sys.stderr)
                    results.append(result)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    table = markdown(results, info, command)
    write_results(out, results, table)
    print(table)
    print(f"wrote {out / 'policy_cost.csv'}, {out / 'policy_cost.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
