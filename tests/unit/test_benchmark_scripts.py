"""The benchmark scripts run end to end on tiny sizes and write complete, well-formed tables.

Benchmarks are never timed in tests: these check that every row is there and every figure is a
finite number, not what the figures are.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_module(
    module: str, args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120,
    )


# ---- sampler_overhead ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler_overhead_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    from benchmarks import sampler_overhead

    out = tmp_path_factory.mktemp("sampler_overhead")
    status = sampler_overhead.main([
        "--batch-sizes", "1,3", "--vocab-sizes", "500", "--repeats", "2", "--warmup", "1",
        "--min-seconds", "0", "--out", str(out),
    ])
    return status, out


def test_sampler_overhead_measures_every_registered_sampler_on_the_grid(
    sampler_overhead_run: tuple[int, Path],
) -> None:
    from vllm_adaptive.sampling.params import SAMPLERS

    status, out = sampler_overhead_run
    rows = read_csv(out / "sampler_overhead.csv")
    assert status == 0, [r for r in rows if r["status"] != "ok"]
    assert {(r["sampler"], r["batch"], r["vocab"]) for r in rows} == {
        (s, b, "500") for s in SAMPLERS for b in ("1", "3")
    }
    assert len(rows) == 2 * len(SAMPLERS)


def test_sampler_overhead_figures_are_finite_and_step_times_positive(
    sampler_overhead_run: tuple[int, Path],
) -> None:
    from benchmarks.sampler_overhead import CSV_COLUMNS

    _, out = sampler_overhead_run
    rows = read_csv(out / "sampler_overhead.csv")
    assert tuple(rows[0]) == CSV_COLUMNS
    for row in rows:
        for column in ("base_ms", "with_ms", "base_min_ms", "with_min_ms"):
            assert float(row[column]) > 0, row
        for column in ("added_ms", "added_iqr_ms", "ratio", "min_ratio"):
            assert math.isfinite(float(row[column])), row
        assert 0 < float(row["kept_pct"]) <= 100, row
        assert int(row["pairs"]) >= 2 and row["status"] == "ok", row


def test_sampler_overhead_markdown_has_a_line_per_row_and_the_machine(
    sampler_overhead_run: tuple[int, Path],
) -> None:
    _, out = sampler_overhead_run
    text = (out / "sampler_overhead.md").read_text()
    rows = read_csv(out / "sampler_overhead.csv")
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(table) == 1 + len(rows)  # header + rows
    assert "torch threads:" in text and "cpus:" in text


def test_sampler_overhead_reports_mirostat_memory_and_the_issue_targets(
    sampler_overhead_run: tuple[int, Path],
) -> None:
    from benchmarks.sampler_overhead import MEMORY_COLUMNS
    from vllm_adaptive.sampling.params import SAMPLERS

    _, out = sampler_overhead_run
    rows = read_csv(out / "mirostat_memory.csv")
    assert tuple(rows[0]) == MEMORY_COLUMNS
    mirostat = {s for s in SAMPLERS if s.startswith("mirostat")}
    assert {(r["sampler"], r["batch"]) for r in rows} == {(s, b) for s in mirostat for b in ("1", "3")}
    for row in rows:
        assert int(row["kept_bytes"]) >= 0 and int(row["peak_bytes"]) >= int(row["kept_bytes"]), row
        assert int(row["held_logits_bytes"]) == 4 * 500 * int(row["batch"]), row  # vLLM's float32 logits
    text = (out / "sampler_overhead.md").read_text()
    assert "Issue #17 targets" in text and "not measured" in text  # no 256 x 131072 row here


def test_sampler_overhead_requests_truncating_values_only_where_the_sampler_takes_them() -> None:
    from benchmarks.sampler_overhead import TRUNCATING_VALUES, sampler_extra_args
    from vllm_adaptive.sampling.params import SAMPLERS, parse_sampler_request

    for name in SAMPLERS:
        args = sampler_extra_args(name)
        assert parse_sampler_request(args) is not None  # valid at admission
        declared = {p.key for p in SAMPLERS[name]}
        assert set(args) - {"adaptive_sampler"} == declared & set(TRUNCATING_VALUES)


def test_sampler_overhead_refuses_an_unknown_sampler(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import sampler_overhead

    assert sampler_overhead.main(["--samplers", "nucleus_v9"]) == 2
    assert "nucleus_v9" in capsys.readouterr().err


# ---- kernel_bandwidth ---------------------------------------------------------------------------


def test_kernel_bandwidth_says_it_needs_cuda_where_there_is_none() -> None:
    proc = run_module(
        "benchmarks.kernel_bandwidth", ["--batch-sizes", "1", "--vocab-sizes", "64"],
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs a CUDA GPU" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr


def test_kernel_bandwidth_cpu_mode_needs_the_interpreter_from_the_start() -> None:
    proc = run_module(
        "benchmarks.kernel_bandwidth", ["--device", "cpu"], env={"TRITON_INTERPRET": "0"}
    )
    assert proc.returncode == 2, proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stderr


def test_kernel_bandwidth_runs_both_kernels_under_the_interpreter(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    proc = run_module(
        "benchmarks.kernel_bandwidth",
        ["--device", "cpu", "--batch-sizes", "1,3", "--vocab-sizes", "300", "--repeats", "2",
         "--warmup", "1", "--copy-mib", "1", "--out", str(tmp_path)],
        env={"TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_csv(tmp_path / "kernel_bandwidth.csv")
    assert [(r["kernel"], r["batch"]) for r in rows] == [
        ("row_stats", "1"), ("threshold_mask", "1"), ("row_stats", "3"), ("threshold_mask", "3")
    ]
    for row in rows:
        assert int(row["bytes_read"]) >= int(row["batch"]) * 300 * 4, row
        for column in ("time_us", "gbps", "fraction_of_copy"):
            assert math.isfinite(float(row[column])) and float(row[column]) > 0, row
    # threshold_mask keeps 1% by default: it writes the other 99% of each row.
    masked = [int(r["bytes_written"]) // 4 for r in rows if r["kernel"] == "threshold_mask"]
    assert masked == [296, 3 * 296]
    assert (tmp_path / "kernel_bandwidth.md").read_text().count("| row_stats |") == 2


def test_kernels_import_without_vllm() -> None:
    """The GPU machines have torch and Triton but no vLLM: the kernels must not need it."""
    code = (
        "import sys\n"
        "import vllm_adaptive.kernels.row_stats, vllm_adaptive.kernels.threshold_mask\n"
        "loaded = sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.'))\n"
        "assert not loaded, loaded\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    ("blocked", "source"),
    [
        ("vllm", "installed package"),  # a GPU machine with torch + Triton and no vLLM
        ("vllm_adaptive", "vllm_adaptive not importable"),  # a checkout that is not installed
    ],
)
def test_kernel_bandwidth_loads_the_kernels_without_vllm(blocked: str, source: str) -> None:
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "from benchmarks.kernel_bandwidth import load_kernels\n"
        "row_stats, threshold_mask, source = load_kernels()\n"
        "assert callable(row_stats.row_stats_triton)\n"
        "assert callable(threshold_mask.threshold_mask_triton_)\n"
        f"assert {source!r} in source, source\n"
        "assert 'vllm.engine' not in sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
