"""KV-cache compaction capacity (issue #18): how many long-prompt requests run at once in a fixed
KV pool, with and without compaction.

    python -m benchmarks.kv_capacity     # the shipped target: 32 recall prompts of ~1024 tokens, 256-512 new tokens

What it measures. One engine (vLLM's CPU engine, engine core in this process so that its
scheduler and block pool can be read) with `kvcache.enabled: true` and a fixed pool of
--blocks KV blocks (`num_gpu_blocks_override`; default: room for --pool-requests requests at
their full length, prompt + max_tokens). Its scheduler is a subclass of the compacting scheduler
(`CapacityScheduler`, below) that records, at every step, the requests running (admitted, holding
blocks), those among them that hold their whole prompt ("generating"), the requests waiting, the
pool's free blocks, the requests preempted and compacted, and when the step started. The same
--requests recall prompts (benchmarks.tasks.recall, ~--prompt-tokens tokens each) are submitted
at once, greedy, request i generating exactly n_i tokens (`ignore_eos`; n_i drawn uniformly from
[--min-tokens, --max-tokens] with a fixed seed, the same in both arms: every arm does the same
work, and requests finish at different times, as a server's do), in two arms back to back on the
same engine:

- `off`: no `kv_budget`: the requests are served as by plain vLLM;
- `on`: every request sends `kv_budget` --budget (a share of its prompt) and `kv_policy`
  --policy: once its prompt is in the cache it is compacted to that share, its tail blocks go
  back to the pool, and it is compacted back each time it has gathered the buffer (`kv_buffer`,
  the deployment's default, 64) of new tokens.

Per arm: peak and mean (over steps) running and generating requests, preemptions (and vLLM's
own counter, a cross-check), compactions, blocks freed (the scheduler's `kv_counters`),
engine steps, generated tokens / wall time of the `generate` call (and on/off), and the pool's
free blocks before and after: they must be equal (no block leaks), and the run stops with an
error if not; every request of the `on` arm must have generated tokens. This is not a quality
benchmark: compaction is lossy (results.json has the share of requests whose tokens equal the
`off` arm's; the recall answer, the first token, is sampled before the first compaction, so its
accuracy would say nothing here).

vLLM admits a request only once its whole prompt fits in the free blocks
(`scheduler_reserve_full_isl`, vLLM 0.32's default), even with chunked prefill; it reserves
nothing for the growth of the requests already running, so those preempt the newest when the
pool runs out. Compaction happens after the last prompt chunk: every request needs its full
prompt's blocks once, and the capacity comes from the requests already compacted. Prefix caching
is off (the arms share prompts; neither may reuse the other's blocks). The default outputs are
long (256-512 tokens, 8-16 blocks of growth a request) because that growth is what makes vLLM
preempt: with short outputs (e.g. --min-tokens 48 --max-tokens 96: at most 3 blocks) a pool
holding whole requests is never overrun by the `off` arm, which then hardly preempts at all,
while a compacted request never holds more than budget + buffer tokens, however long it runs.

The issue's line, checked in the footer: with compaction to 1/4 of the prompt, at least 2.5x as
many requests run at once (peak running, on over off) and fewer preemptions than without it.
Writes results.json (arguments, engine settings, both arms with their per-step traces, checks)
and table.md to --out (default results/kv-capacity/<date-time>/), and prints the table.
Tokens/s are wall-clock on a shared CPU: compare arms of the same run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_adaptive.kvcache.config import KV_POLICIES, KVCompactionConfig
from vllm_adaptive.kvcache.plan import PLAN_ATTRIBUTE
from vllm_adaptive.kvcache.scheduler import CompactingScheduler

DEFAULT_REQUESTS = 32
DEFAULT_PROMPT_TOKENS = 1024
DEFAULT_MAX_TOKENS = 512
DEFAULT_MIN_TOKENS = 256
DEFAULT_BUDGET = 0.25
DEFAULT_POOL_REQUESTS = 5.0
BLOCK_SIZE = 32
MAX_NUM_BATCHED_TOKENS = 512
KV_CACHE_BYTES = 256 << 20  # what vLLM profiles against; the pool itself is --blocks
PROMPT_SEED = 18  # the prompts; the lengths n_i: seed + 1
ENGINE_SEED = 0
# The line.
MIN_CAPACITY_RATIO = 2.5


# --- the recording scheduler (engine core in process) --------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """The scheduler's state after one `schedule()`."""

    running: int  # admitted requests (holding blocks)
    generating: int  # running requests whose whole prompt is in the cache
    waiting: int
    free_blocks: int
    preempted: int  # requests preempted by this step
    compacted: int  # requests compacted by this step
    at: float  # perf_counter() when the step was scheduled (run_arm: seconds since the arm began)


class CapacityScheduler(CompactingScheduler):
    """The compacting scheduler, recording a `Step` per step with work (running or waiting)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[Step] = []

    def schedule(self, throttle_prefills: bool = False) -> Any:
        at = time.perf_counter()
        output = super().schedule(throttle_prefills)
        running, waiting = self.get_request_counts()
        if running or waiting:
            generating = sum(r.num_computed_tokens >= r.num_prompt_tokens for r in self.running)
            plan = getattr(output, PLAN_ATTRIBUTE, None)
            self.steps.append(Step(running, generating, waiting, self.kv_cache_manager.block_pool.get_num_free_blocks(),
                                   len(output.preempted_req_ids or ()), len(plan.compact) if plan else 0, at))
        return output


# --- one arm --------------------------------------------------------------------------------------


class PoolLeakError(RuntimeError):
    """The pool's free blocks after an arm differ from before it."""


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str  # off, on
    requests: int
    seconds: float
    engine_steps: int
    generated: int
    peak_running: int
    mean_running: float
    peak_generating: int
    mean_generating: float
    preemptions: int
    vllm_preemptions: int  # vLLM's own counter (vllm:num_preemptions), a cross-check
    compactions: int
    scored: int  # worker: compactions whose kept tokens came from the policy's scores
    degraded: int  # worker: scored compactions that fell back to streaming
    blocks_freed: int
    tokens_evicted: int
    free_blocks_start: int
    free_blocks_end: int
    min_free_blocks: int
    empty_outputs: int
    load_average: tuple[float, float]  # the machine's 1-minute load average before and after
    tokens: list[list[int]]
    steps: list[Step]

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def run_arm(llm: Any, name: str, prompts: Sequence[list[int]], lengths: Sequence[int],
            extra_args: dict[str, Any] | None) -> Arm:
    """Generate every prompt at once, greedy, exactly `lengths[i]` tokens for prompt i; the arm's figures."""
    from vllm import SamplingParams

    scheduler = scheduler_of(llm)
    pool = scheduler.kv_cache_manager.block_pool
    start = pool.get_num_free_blocks()
    before = dataclasses.replace(scheduler.kv_counters)
    scheduler.steps = []
    vllm_before = vllm_preemptions(llm)
    worker_before = worker_counters(llm)
    load_before = os.getloadavg()[0]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, extra_args=extra_args) for n in lengths]
    began = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - began
    end = pool.get_num_free_blocks()
    if end != start or scheduler.kv_evicted:
        raise PoolLeakError(f"arm {name}: the pool had {start} free blocks before and {end} after "
                            f"(eviction state left: {len(scheduler.kv_evicted)} requests)")
    steps = [dataclasses.replace(s, at=s.at - began) for s in scheduler.steps]
    worker_after = worker_counters(llm)
    after = scheduler.kv_counters
    return Arm(
        name=name, requests=len(prompts), seconds=seconds, engine_steps=len(steps),
        generated=sum(len(o.outputs[0].token_ids) for o in outputs),
        peak_running=max((s.running for s in steps), default=0),
        mean_running=statistics.fmean(s.running for s in steps) if steps else 0.0,
        peak_generating=max((s.generating for s in steps), default=0),
        mean_generating=statistics.fmean(s.generating for s in steps) if steps else 0.0,
        preemptions=sum(s.preempted for s in steps),
        vllm_preemptions=vllm_preemptions(llm) - vllm_before,
        compactions=after.compactions - before.compactions,
        scored=worker_after["scored"] - worker_before["scored"],
        degraded=worker_after["degraded"] - worker_before["degraded"],
        blocks_freed=after.blocks_freed - before.blocks_freed,
        tokens_evicted=after.tokens_evicted - before.tokens_evicted,
        free_blocks_start=start, free_blocks_end=end,
        min_free_blocks=min((s.free_blocks for s in steps), default=start),
        empty_outputs=sum(not o.outputs[0].token_ids for o in outputs),
        load_average=(load_before, os.getloadavg()[0]),
        tokens=[list(o.outputs[0].token_ids) for o in outputs],
        steps=steps,
    )


def vllm_preemptions(llm: Any) -> int:
    return round(sum(float(m.value) for m in llm.get_metrics()
                     if m.name.removesuffix("_total") == "vllm:num_preemptions"))


def worker_counters(llm: Any) -> dict[str, int]:
    from vllm_adaptive.kvcache.worker import worker_snapshot

    [snapshot] = llm.collective_rpc(worker_snapshot)
    return snapshot


def scheduler_of(llm: Any) -> CapacityScheduler:
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    if not isinstance(scheduler, CapacityScheduler):
        raise RuntimeError("the engine core must run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) "
                           f"with CapacityScheduler, got {type(scheduler).__name__}")
    return scheduler


# --- the run --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str  # a model folder
    requests: int = DEFAULT_REQUESTS
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = DEFAULT_MIN_TOKENS
    budget: float = DEFAULT_BUDGET
    policy: str = KVCompactionConfig().policy
    pool_requests: float = DEFAULT_POOL_REQUESTS
    blocks: int | None = None  # the pool; None: pool_requests full-length requests
    block_size: int = BLOCK_SIZE
    max_num_batched_tokens: int = MAX_NUM_BATCHED_TOKENS
    order: tuple[str, ...] = ("off", "on")
    seed: int = PROMPT_SEED
    dtype: str = "float32"
    enforce_eager: bool = False


def recall_prompts(tokenizer: Any, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    from benchmarks.tasks import recall

    rng = random.Random(seed)
    return [tokenizer.encode(recall.generate(rng, prompt_tokens=prompt_tokens).prompt) for _ in range(n)]


def output_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def pool_blocks(settings: Settings, longest_prompt: int) -> int:
    """The pool (`num_gpu_blocks_override`): --blocks, or pool_requests requests at full length,
    plus vLLM's null block."""
    if settings.blocks is not None:
        return settings.blocks
    per_request = math.ceil((longest_prompt + settings.max_tokens) / settings.block_size)
    return math.ceil(settings.pool_requests * per_request) + 1


def engine_arguments(settings: Settings, blocks: int, max_model_len: int) -> dict[str, Any]:
    return {"block_size": settings.block_size, "num_gpu_blocks_override": blocks,
            "kv_cache_memory_bytes": KV_CACHE_BYTES,
            "max_model_len": max_model_len, "max_num_seqs": max(settings.requests, 8),
            "max_num_batched_tokens": settings.max_num_batched_tokens, "enable_chunked_prefill": True,
            "enable_prefix_caching": False, "disable_log_stats": False, "dtype": settings.dtype, "seed": ENGINE_SEED,
            "enforce_eager": settings.enforce_eager}


def run(settings: Settings) -> dict[str, Any]:
    """Start the engine, run the arms in `settings.order`, return the results (JSON-ready)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    import vllm_adaptive
    from benchmarks.evaluate import model_max_len

    tokenizer = AutoTokenizer.from_pretrained(settings.model)
    prompts = recall_prompts(tokenizer, settings.requests, settings.prompt_tokens, settings.seed)
    lengths = output_lengths(settings.requests, settings.min_tokens, settings.max_tokens, settings.seed + 1)
    longest = max(len(p) for p in prompts)
    blocks = pool_blocks(settings, longest)
    max_model_len = model_max_len(settings.model, cap=longest + settings.max_tokens)
    if blocks - 1 < math.ceil((longest + settings.max_tokens) / settings.block_size):
        raise ValueError(f"a pool of {blocks} blocks cannot hold one request of {longest + settings.max_tokens} tokens")
    engine = engine_arguments(settings, blocks, max_model_len)
    kwargs = vllm_adaptive.engine_kwargs({"kvcache": {"enabled": True}}, **engine)
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler and its pool in this process
    try:
        started = time.perf_counter()
        llm = LLM(settings.model, **{**kwargs, "scheduler_cls": CapacityScheduler})
        startup = time.perf_counter() - started
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    compact = {"kv_budget": settings.budget, "kv_policy": settings.policy}
    arms: dict[str, Arm] = {}
    try:
        # One-off costs (first prefill and decode shapes, the first compaction) stay out of the arms.
        llm.generate([{"prompt_token_ids": prompts[0]}] * 2, [SamplingParams(temperature=0.0, max_tokens=4),
                     SamplingParams(temperature=0.0, max_tokens=4, extra_args=compact)], use_tqdm=False)
        for name in settings.order:
            print(f"arm {name}: {settings.requests} requests", file=sys.stderr, flush=True)
            arms[name] = run_arm(llm, name, prompts, lengths, compact if name == "on" else None)
    finally:
        llm.llm_engine.engine_core.shutdown()
    checks = capacity_checks(arms["off"], arms["on"]) if {"off", "on"} <= set(arms) else {}
    if "on" in arms and arms["on"].empty_outputs:
        raise RuntimeError(f"arm on: {arms['on'].empty_outputs} requests generated nothing")
    return {"settings": dataclasses.asdict(settings), "pool_blocks": blocks, "usable_blocks": blocks - 1,
            "longest_prompt": longest, "mean_prompt": statistics.fmean(len(p) for p in prompts),
            "output_lengths": lengths,
            "engine": engine, "startup_seconds": startup, "checks": checks,
            "arms": {name: {**dataclasses.asdict(arm), "tokens_per_s": arm.tokens_per_s} for name, arm in arms.items()}}


def capacity_checks(off: Arm, on: Arm) -> dict[str, Any]:
    ratio = on.peak_running / off.peak_running if off.peak_running else None
    return {"peak_running_ratio": ratio, "capacity_ok": ratio is not None and ratio >= MIN_CAPACITY_RATIO,
            "fewer_preemptions": on.preemptions < off.preemptions,
            "identical_to_off": sum(a == b for a, b in zip(on.tokens, off.tokens)) / max(len(on.tokens), 1),
            "tokens_per_s_ratio": on.tokens_per_s / off.tokens_per_s if off.tokens_per_s else None}


# --- the table ------------------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    settings, arms = result["settings"], result["arms"]
    header = ["arm", "peak running", "mean running", "peak generating", "mean generating", "preemptions",
              "compactions", "blocks freed", "engine steps", "tokens/s", "free blocks start/end"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "--:|" * (len(header) - 1)]
    for name, a in arms.items():
        label = name if name == "off" else f"on ({settings['policy']}, {settings['budget']:g})"
        lines.append("| " + " | ".join([
            label, str(a["peak_running"]), f"{a['mean_running']:.1f}", str(a["peak_generating"]),
            f"{a['mean_generating']:.1f}", str(a["preemptions"]), str(a["compactions"]), str(a["blocks_freed"]),
            str(a["engine_steps"]), f"{a['tokens_per_s']:.1f}",
            f"{a['free_blocks_start']}/{a['free_blocks_end']}"]) + " |")
    lines.append("")
    lines.append(f"{settings['requests']} recall prompts (mean {result['mean_prompt']:.0f}, longest "
                 f"{result['longest_prompt']} tokens), {settings['min_tokens']}-{settings['max_tokens']} "
                 "new tokens each "
                 f"(greedy, ignore_eos); "
                 f"pool {result['usable_blocks']} usable blocks of {settings['block_size']} tokens; "
                 f"chunked prefill, {settings['max_num_batched_tokens']} tokens a step; {settings['dtype']}.")
    checks = result["checks"]
    if checks:
        ratio = checks["peak_running_ratio"]
        shown = "n/a" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"- peak running on/off: {shown} (>= {MIN_CAPACITY_RATIO}x required): "
                     f"{'yes' if checks['capacity_ok'] else 'no'}")
        lines.append(f"- preemptions on < off: {arms['on']['preemptions']} vs {arms['off']['preemptions']}: "
                     f"{'yes' if checks['fewer_preemptions'] else 'no'}")
        if checks["tokens_per_s_ratio"] is not None:
            lines.append(f"- generated tokens/s on/off: {checks['tokens_per_s_ratio']:.2f}x")
    loads = ", ".join(f"{name} {a['load_average'][0]:.1f}/{a['load_average'][1]:.1f}" for name, a in arms.items())
    lines.append(f"- the machine's 1-minute load average before/after each arm: {loads} "
                 f"({os.cpu_count()} CPUs; tokens/s are wall-clock)")
    if "on" in arms and settings["policy"] != "streaming":
        on = arms["on"]
        lines.append(f"- {settings['policy']}: {on['scored']} compactions scored, {on['degraded']} fell back "
                     "to streaming")
    return "\n".join(lines)


# --- the command line -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_capacity", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="target", help="a model folder, `tiny`, or a shipped model's name")
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="recall prompts, submitted at once")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS, help="prompt length (at most)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="most tokens generated by a request")
    parser.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS,
                        help="fewest tokens generated by a request (each draws its count in [min, max])")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                        help="kv_budget of the on arm: a share of the prompt in (0, 1), or tokens (>= 1)")
    parser.add_argument("--policy", choices=KV_POLICIES, default=KVCompactionConfig().policy,
                        help="kv_policy of the on arm")
    parser.add_argument("--pool-requests", type=float, default=DEFAULT_POOL_REQUESTS,
                        help="pool size in full-length requests (prompt + max tokens)")
    parser.add_argument("--blocks", type=int, default=None, help="pool size in blocks (overrides --pool-requests)")
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    parser.add_argument("--max-num-batched-tokens", type=int, default=MAX_NUM_BATCHED_TOKENS,
                        help="tokens per step (prompt chunks)")
    parser.add_argument("--order", default="off,on", help="arms in the order they run, e.g. on,off")
    parser.add_argument("--seed", type=int, default=PROMPT_SEED, help="seed of the recall prompts")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/kv-capacity/<date-time>)")
    args = parser.parse_args(argv)
    args.order = tuple(a.strip() for a in args.order.split(",") if a.strip())
    if not args.order or set(args.order) - {"off", "on"} or len(set(args.order)) != len(args.order):
        parser.error(f"--order: off and/or on, each once, got {args.order}")
    if args.requests < 1 or args.min_tokens < 1 or args.block_size < 1 or args.max_num_batched_tokens < 1:
        parser.error("--requests, --min-tokens, --block-size, --max-num-batched-tokens must be >= 1")
    if args.max_tokens < args.min_tokens:
        parser.error(f"--max-tokens ({args.max_tokens}) must be >= --min-tokens ({args.min_tokens})")
    if not (0 < args.budget < 1 or (args.budget >= 1 and args.budget.is_integer())):
        parser.error(f"--budget: a share in (0, 1) or an integer >= 1, got {args.budget}")
    if args.pool_requests <= 0 or (args.blocks is not None and args.blocks < 2):
        parser.error("--pool-requests must be > 0 and --blocks >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from benchmarks.evaluate import resolve_model

    budget = int(args.budget) if args.budget >= 1 else args.budget
    settings = Settings(model=resolve_model(args.model).path, requests=args.requests,
                        prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                        budget=budget, policy=args.policy, pool_requests=args.pool_requests,
                        blocks=args.blocks, block_size=args.block_size,
                        max_num_batched_tokens=args.max_num_batched_tokens, order=args.order, seed=args.seed,
                        dtype=args.dtype, enforce_eager=args.enforce_eager)
    result = run(settings)
    result["command"] = "python -m benchmarks.kv_capacity " + " ".join(sys.argv[1:] if argv is None else argv)
    out = args.out or Path("results") / "kv-capacity" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    table = format_table(result)
    (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten to {out}/ (results.json, table.md)", file=sys.stderr)


if __name__ == "__main__":
    main()
