"""Sizing study: decode speed of random-weight Llama shapes in vLLM's CPU engine.

    python -m benchmarks.models.sizing [--reference h128-L1] [--only h256-L8 ...] [--repeats 6]

Chooses the draft/target shapes of `benchmarks.models.pair`: the draft has to generate at least
4x faster than the target at batch 1 *in the engine*. With small models on CPU, vLLM's per-step
and per-layer fixed costs, not FLOPs, set the speed, so parameter counts alone mislead.

Each shape is built with random weights (`benchmarks.models.tiny`, the project tokenizer) and
timed in an offline `LLM` (1 GiB KV cache, default dtype: vLLM on CPU runs float32 checkpoints
in bfloat16) on greedy decoding with `ignore_eos`: one prompt, then a batch of identical
prompts. The machine is shared, and its speed drifts by 2x within minutes, so every candidate
runs in one process with an engine of the reference shape (the draft), generate calls
alternating between the two; the ratio is taken call pair by call pair and its median kept.
Only one engine generates at a time. Prints a table and writes it (markdown + JSON) to `--out`
(default results/sizing/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.models.tiny import TinyLlamaSpec

PROMPT = "Once upon a time there was a little fox named Mia. One day Mia went to the river."


def _spec(name: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
          vocab: int = 1024) -> TinyLlamaSpec:
    return TinyLlamaSpec(name=f"sizing-{name}", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_heads=heads, num_kv_heads=kv_heads, intermediate_size=intermediate)


CANDIDATES: dict[str, TinyLlamaSpec] = {
    # drafts
    "h64-L1": _spec("h64-L1", 64, 1, 2, 1, 192),
    "h128-L1": _spec("h128-L1", 128, 1, 4, 2, 384),
    "h64-L32": _spec("h64-L32", 64, 32, 2, 1, 192),
    "h64-L48": _spec("h64-L48", 64, 48, 2, 1, 192),
    "h128-L2": _spec("h128-L2", 128, 2, 4, 2, 384),
    # targets
    "h128-L8": _spec("h128-L8", 128, 8, 4, 2, 384),
    "h128-L12": _spec("h128-L12", 128, 12, 4, 2, 384),
    "h128-L24": _spec("h128-L24", 128, 24, 4, 2, 384),
    "h128-L32": _spec("h128-L32", 128, 32, 4, 2, 256),
    "h128-L40": _spec("h128-L40", 128, 40, 4, 2, 256),
    "h192-L8": _spec("h192-L8", 192, 8, 6, 2, 512),
    "h256-L6": _spec("h256-L6", 256, 6, 8, 4, 768),
    "h256-L8": _spec("h256-L8", 256, 8, 8, 4, 768),
    "h192-L16": _spec("h192-L16", 192, 16, 6, 2, 512),
    "h256-L12": _spec("h256-L12", 256, 12, 8, 4, 768),
    "h256-L16-i512": _spec("h256-L16-i512", 256, 16, 8, 4, 512),
    "h256-L20-i512": _spec("h256-L20-i512", 256, 20, 8, 4, 512),
    "h384-L6": _spec("h384-L6", 384, 6, 6, 2, 1024),
}


def _from_pair(role: str) -> TinyLlamaSpec:
    """The shape of the project's trained draft or target (benchmarks.models.pair), random weights."""
    from benchmarks.models.pair import CONFIGS

    shape = CONFIGS[role].shape
    return TinyLlamaSpec(name=f"sizing-pair-{role}", vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                         num_layers=shape.num_layers, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
                         intermediate_size=shape.intermediate_size)


CANDIDATES["pair-draft"] = _from_pair("draft")
CANDIDATES["pair-target"] = _from_pair("target")


def parameter_count(spec: TinyLlamaSpec) -> int:
    head_dim = spec.hidden_size // spec.num_heads
    attention = spec.hidden_size * head_dim * (2 * spec.num_heads + 2 * spec.num_kv_heads)
    mlp = 3 * spec.hidden_size * spec.intermediate_size
    per_layer = attention + mlp + 2 * spec.hidden_size
    return spec.num_layers * per_layer + 2 * spec.vocab_size * spec.hidden_size + spec.hidden_size


def _timed_generate(llm, size: int, params) -> float:
    t0 = time.perf_counter()
    outputs = llm.generate([PROMPT] * size, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def measure_pair(reference: TinyLlamaSpec, candidate: TinyLlamaSpec, max_tokens: int, batch: int, repeats: int,
                 dtype: str) -> dict:
    """Run in a fresh process: both engines up, generate calls alternating between them, so the
    two see the same machine load (an idle engine costs ~0.1 core here)."""
    from vllm import LLM, SamplingParams

    from benchmarks.models.tiny import ensure_tiny_llama

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engines = {}
    for role, spec in (("reference", reference), ("candidate", candidate)):
        engines[role] = LLM(str(ensure_tiny_llama(spec)), kv_cache_memory_bytes=1 << 30, max_model_len=2048,
                            seed=0, dtype=dtype)
        engines[role].generate([PROMPT] * batch, params, use_tqdm=False)  # warm-up
    result = {role: {f"tok_s_b{size}": [] for size in (1, batch)} for role in engines}
    for r in range(repeats):
        for size in (1, batch):
            for role in ("reference", "candidate") if r % 2 == 0 else ("candidate", "reference"):
                result[role][f"tok_s_b{size}"].append(_timed_generate(engines[role], size, params))
    for llm in engines.values():
        llm.llm_engine.engine_core.shutdown()
    return result


def run_worker(args: argparse.Namespace) -> None:
    reference, candidate = (TinyLlamaSpec(**json.loads(s)) for s in args.worker)
    result = measure_pair(reference, candidate, args.max_tokens, args.batch, args.repeats, args.dtype)
    print("SIZING_RESULT " + json.dumps(result), flush=True)


def measure_in_subprocess(reference: TinyLlamaSpec, candidate: TinyLlamaSpec, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "benchmarks.models.sizing",
               "--worker", json.dumps(dataclasses.asdict(reference)), json.dumps(dataclasses.asdict(candidate)),
               "--max-tokens", str(args.max_tokens), "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--dtype", args.dtype]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in proc.stdout.splitlines():
        if line.startswith("SIZING_RESULT "):
            return json.loads(line.removeprefix("SIZING_RESULT "))
    raise RuntimeError(f"sizing worker for {candidate.name} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


def _median(values) -> float:
    return statistics.median(values)


def table(reference: str, names: list[str], results: dict[str, dict], batch: int) -> str:
    """One row per candidate: its speed, the reference's speed in the same process (alternating
    calls), and how many times faster the reference is (the figure that decides the pair)."""
    lines = [
        f"| shape | layers | hidden | heads/kv | params (M) | tok/s b1 | ms/token b1 | tok/s b{batch} "
        f"| {reference} tok/s b1 (same run) | {reference} / shape b1 | {reference} / shape b{batch} |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for name in names:
        spec, run = CANDIDATES[name], results[name]
        cand, ref = run["candidate"], run["reference"]
        b1, bn = _median(cand["tok_s_b1"]), _median(cand[f"tok_s_b{batch}"])
        ratio1 = _median(r / c for r, c in zip(ref["tok_s_b1"], cand["tok_s_b1"]))
        ration = _median(r / c for r, c in zip(ref[f"tok_s_b{batch}"], cand[f"tok_s_b{batch}"]))
        lines.append(
            f"| {name} | {spec.num_layers} | {spec.hidden_size} | {spec.num_heads}/{spec.num_kv_heads} "
            f"| {parameter_count(spec) / 1e6:.2f} | {b1:.0f} | {1000 / b1:.2f} | {bn:.0f} "
            f"| {_median(ref['tok_s_b1']):.0f} | {ratio1:.2f} | {ration:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="h128-L1", choices=sorted(CANDIDATES),
                        help="shape every candidate is timed against, in the same process (the draft)")
    parser.add_argument("--only", nargs="*", choices=sorted(CANDIDATES), help="candidates (default all)")
    parser.add_argument("--repeats", type=int, default=6, help="timed generate calls per batch size and engine")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto = bfloat16 on CPU)")
    parser.add_argument("--out", type=Path, default=Path("results/sizing"))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    names = args.only or [n for n in CANDIDATES if n != args.reference]
    reference = CANDIDATES[args.reference]
    results: dict[str, dict] = {}
    for name in names:
        results[name] = run = measure_in_subprocess(reference, CANDIDATES[name], args)
        ratio = _median(r / c for r, c in zip(run["reference"]["tok_s_b1"], run["candidate"]["tok_s_b1"]))
        print(f"{name}: b1 {_median(run['candidate']['tok_s_b1']):.0f} tok/s, "
              f"{args.reference} {_median(run['reference']['tok_s_b1']):.0f} tok/s: {ratio:.2f}x", flush=True)

    report = (
        f"Decode tokens/s in vLLM's CPU engine (dtype {args.dtype}, greedy, {args.max_tokens} tokens, "
        f"median of {args.repeats} calls alternating with {args.reference} in the same process)\n\n"
        + table(args.reference, names, results, args.batch) + "\n"
    )
    print("\n" + report)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sizing-{args.reference}-{args.dtype}"
    (args.out / f"{stem}.md").write_text(report)
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()},
         "specs": {n: dataclasses.asdict(CANDIDATES[n]) for n in [args.reference, *names]},
         "runs": results}, indent=2))
    print(f"wrote {args.out}/{stem}.md")


if __name__ == "__main__":
    main()
