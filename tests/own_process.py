"""Run a file of pytest cases in a fresh pytest process and check that all of them passed.

For cases that change the process for good (binding vLLM's C++ kernels, as a worker does at
start), so that they cannot share the suite's process.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def assert_all_pass_in_own_process(cases: Path, expected: int, timeout: float = 600) -> None:
    """Run `cases` in its own pytest process: exit 0 and exactly `expected` passed."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None and int(passed.group(1)) == expected and "failed" not in summary, summary
