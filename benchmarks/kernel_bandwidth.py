"""Achieved memory bandwidth of the samplers' Triton kernels, as a share of the GPU's copy speed.

`python -m benchmarks.kernel_bandwidth` (needs CUDA and Triton; not vLLM) times
`row_stats_triton` (one read of logits [R, V]) and `threshold_mask_triton_` (one read, and a
write of every element it masks) from `kernels/`, on float32 logits over the same grid as
`benchmarks.sampler_overhead`, with CUDA events and L2 flushed before each launch. It measures the
device's copy bandwidth with a large device-to-device `Tensor.copy_` (bytes read + written) and
reports each kernel's GB/s as a fraction of it. Results go to stdout (Markdown) and to `--out`
(CSV + Markdown).

`TRITON_INTERPRET=1 python -m benchmarks.kernel_bandwidth --device cpu ...` runs the same code
through Triton's interpreter on CPU tensors: a check of the script, not a measurement.

The kernels come from the installed `vllm_adaptive.kernels` when that imports; otherwise (a GPU
machine without vLLM, where `vllm_adaptive` refuses to import) from this checkout's `kernels/`
folder, loaded as a stand-alone package.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import importlib
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

DEFAULT_BATCH_SIZES = (1, 32, 256)
DEFAULT_VOCAB_SIZES = (32768, 131072)
SEED = 0
L2_FLUSH_BYTES = 256 * 2**20  # larger than any current GPU's L2
KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"

CSV_COLUMNS = (
    "kernel",
    "batch",
    "vocab",
    "time_us",
    "bytes_read",
    "bytes_written",
    "gbps",
    "fraction_of_copy",
)


class Unsupported(Exception):
    """This machine cannot run the benchmark as asked; the message says what to do instead."""


@dataclasses.dataclass(frozen=True)
class Result:
    kernel: str
    batch: int
    vocab: int
    time_us: float  # median over launches
    bytes_read: int
    bytes_written: int
    gbps: float  # (read + written) / time, 1e9 bytes per second
    fraction_of_copy: float  # gbps / the device's copy bandwidth

    def csv_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


# ---- setup ----------------------------------------------------------------------------------


def load_kernels() -> tuple[ModuleType, ModuleType, str]:
    """(row_stats module, threshold_mask module, where they came from)."""
    try:
        from vllm_adaptive.kernels import row_stats, threshold_mask

        return row_stats, threshold_mask, "vllm_adaptive.kernels (installed package)"
    except ImportError as e:
        reason = f"{type(e).__name__}: {str(e).split('. ')[0]}"
    name = "_vllm_adaptive_kernels_source"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, KERNELS_DIR / "__init__.py", submodule_search_locations=[str(KERNELS_DIR)]
        )
        if spec is None or spec.loader is None:
            raise Unsupported(f"cannot load the kernels from {KERNELS_DIR}")
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    row_stats = importlib.import_module(f"{name}.row_stats")
    threshold_mask = importlib.import_module(f"{name}.threshold_mask")
    return row_stats, threshold_mask, f"{KERNELS_DIR} (vllm_adaptive not importable: {reason})"


def check_machine(device: str) -> None:
    if importlib.util.find_spec("triton") is None:
        raise Unsupported(
            "kernel_bandwidth needs Triton, which is not installed (pip install triton)"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise Unsupported(
            f"kernel_bandwidth needs a CUDA GPU: torch {torch.__version__} sees none "
            "(torch.cuda.is_available() is False). Run it on a GPU machine; to check the script's "
            "logic on CPU, run the kernels under Triton's interpreter: "
            "TRITON_INTERPRET=1 python -m benchmarks.kernel_bandwidth --device cpu "
            "--batch-sizes 2 --vocab-sizes 1000"
        )
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unsupported(
            "--device cpu runs the kernels under Triton's interpreter, which must be on when "
            "Python starts: TRITON_INTERPRET=1 python -m benchmarks.kernel_bandwidth "
            "--device cpu ..."
        )


# ---- timing ---------------------------------------------------------------------------------


class Timer:
    """Seconds per call of a function: CUDA events with L2 flushed first, or wall time on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = (
            torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None
        )

    def __call__(self, fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        times: list[float] = []
        if not self.cuda:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return times
        assert self._flush is not None
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(repeats)
        ]
        torch.cuda.synchronize(self.device)
        for start, end in events:
            self._flush.zero_()  # so every launch reads from DRAM, as a step's fresh logits do
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]


def copy_bandwidth(timer: Timer, nbytes: int, repeats: int, warmup: int) -> float:
    """Device-to-device `copy_` bandwidth in GB/s, counting bytes read plus bytes written."""
    numel = nbytes // 4
    src = torch.randn(numel, device=timer.device)
    dst = torch.empty_like(src)
    seconds = statistics.median(timer(lambda: dst.copy_(src), repeats, warmup))
    return 2 * numel * 4 / seconds / 1e9


def make_logits(batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Float32 logits [batch, vocab], N(0, 3^2), made on CPU with a fixed seed."""
    generator = torch.Generator().manual_seed(SEED)
    return (torch.randn(batch, vocab, generator=generator) * 3.0).to(device)


def measure_grid(
    row_stats: ModuleType,
    threshold_mask: ModuleType,
    timer: Timer,
    batch_sizes: Sequence[int],
    vocab_sizes: Sequence[int],
    *,
    keep_fraction: float,
    repeats: int,
    warmup: int,
    copy_gbps: float,
) -> list[Result]:
    results: list[Result] = []

    def result(
        kernel: str, batch: int, vocab: int, times: list[float], read: int, written: int
    ) -> Result:
        seconds = statistics.median(times)
        gbps = (read + written) / seconds / 1e9
        return Result(kernel, batch, vocab, seconds * 1e6, read, written, gbps, gbps / copy_gbps)

    for batch in batch_sizes:
        for vocab in vocab_sizes:
            logits = make_logits(batch, vocab, timer.device)
            elem = logits.element_size()

            floats = torch.empty((5, batch), dtype=torch.float32, device=timer.device)
            count = torch.empty(batch, dtype=torch.int32, device=timer.device)
            out = row_stats.RowStats(*floats, count)
            times = timer(lambda: row_stats.row_stats_triton(logits, out=out), repeats, warmup)
            read = batch * vocab * elem
            written = 6 * batch * 4  # five float32 statistics and an int32 count per row
            results.append(result("row_stats", batch, vocab, times, read, written))

            # Thresholds that keep the top `keep_fraction` of each row, as a truncating sampler
            # does. Masking is idempotent, so every launch writes the same elements.
            k = max(1, min(vocab, round((1.0 - keep_fraction) * vocab)))
            threshold = torch.kthvalue(logits.float().cpu(), k, dim=-1).values.to(timer.device)
            threshold = threshold.contiguous()
            threshold_mask.threshold_mask_triton_(logits, threshold)
            masked = int(torch.isinf(logits).sum().item())
            times = timer(
                lambda: threshold_mask.threshold_mask_triton_(logits, threshold), repeats, warmup
            )
            read = batch * vocab * elem + batch * 4  # logits and one threshold per row
            results.append(result("threshold_mask", batch, vocab, times, read, masked * elem))
            del logits, floats, out
    return results


# ---- report ---------------------------------------------------------------------------------


def machine_info(
    device: torch.device, source: str, copy_gbps: float, copy_mib: int
) -> dict[str, str]:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        what = f"{name}, CUDA {torch.version.cuda}"
    else:
        what = "CPU under TRITON_INTERPRET=1 (checks the script; the figures mean nothing)"
    return {
        "device": what,
        "copy bandwidth": f"{copy_gbps:.1f} GB/s (copy_ of {copy_mib} MiB, read + written)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "kernels from": source,
        "timing": "median over launches; CUDA events; L2 flushed before each launch"
        if device.type == "cuda"
        else "median wall time over launches",
    }


def markdown(results: Sequence[Result], info: dict[str, str], command: str) -> str:
    lines = [
        "# Sampler kernels: achieved bandwidth vs the device's copy bandwidth",
        "",
        f"Command: `{command}`",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        "",
        "| kernel | batch | vocab | time (us) | MB moved | GB/s | fraction of copy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        moved = (r.bytes_read + r.bytes_written) / 1e6
        lines.append(
            f"| {r.kernel} | {r.batch} | {r.vocab} | {r.time_us:.1f} | {moved:.3f} "
            f"| {r.gbps:.1f} | {r.fraction_of_copy:.2f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: Sequence[Result], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernel_bandwidth.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for r in results:
            writer.writerow(r.csv_row())
    (out / "kernel_bandwidth.md").write_text(table)


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
        prog="python -m benchmarks.kernel_bandwidth",
        description="Achieved bandwidth of the samplers' Triton kernels vs the GPU's copy speed.",
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default), or cpu under TRITON_INTERPRET=1 to check the script")
    parser.add_argument("--batch-sizes", type=_int_list, default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--vocab-sizes", type=_int_list, default=list(DEFAULT_VOCAB_SIZES))
    parser.add_argument("--repeats", type=int, default=100, help="timed launches per kernel (100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed launches first (10)")
    parser.add_argument("--keep-fraction", type=float, default=0.01,
                        help="share of each row threshold_mask keeps (0.01)")
    parser.add_argument(
        "--copy-mib", type=int, help="size of the copy_ measurement (1024 on cuda, 16 on cpu)"
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default results/kernel_bandwidth/<time>)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if not 0.0 < args.keep_fraction <= 1.0:
        parser.error(f"--keep-fraction must be in (0, 1], got {args.keep_fraction}")
    if args.copy_mib is not None and args.copy_mib < 1:
        parser.error(f"--copy-mib must be >= 1, got {args.copy_mib}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_machine(args.device)
        row_stats, threshold_mask, source = load_kernels()
    except Unsupported as e:
        print(f"kernel_bandwidth: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    out = args.out or Path("results") / "kernel_bandwidth" / datetime.datetime.now().strftime(
        "%Y%m%d-%H%M%S"
    )
    given = list(argv) if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.kernel_bandwidth", *given])
    timer = Timer(device)
    copy_mib = args.copy_mib or (1024 if device.type == "cuda" else 16)
    copy_gbps = copy_bandwidth(
        timer, copy_mib * 2**20, max(10, args.repeats // 5), max(1, args.warmup // 5)
    )
    results = measure_grid(
        row_stats, threshold_mask, timer, args.batch_sizes, args.vocab_sizes,
        keep_fraction=args.keep_fraction, repeats=args.repeats, warmup=args.warmup,
        copy_gbps=copy_gbps,
    )
    status = 0
    if not all(math.isfinite(r.gbps) and r.gbps > 0 for r in results):
        print("kernel_bandwidth: a figure came out non-positive or non-finite", file=sys.stderr)
        status = 1
    table = markdown(results, machine_info(device, source, copy_gbps, copy_mib), command)
    write_results(out, results, table)
    print(table)
    print(f"wrote {out / 'kernel_bandwidth.csv'}, {out / 'kernel_bandwidth.md'}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
