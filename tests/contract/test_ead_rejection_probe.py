"""The routing gate against vLLM's own `rejection_sample` (tests/contract/ead_rejection_probe_cases.py).

The cases bind vLLM's rejection kernels to the CPU build's C++ versions, as a worker does at
start (`register_triton_kernel_overrides`), which changes vLLM's modules for the rest of the
process: later contract checks in the same process then fail. So they run in their own pytest
process, and this test asserts that every case passed there.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

CASES = Path(__file__).with_name("ead_rejection_probe_cases.py")


def test_every_rejection_probe_case_passes_in_its_own_process() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
        capture_output=True, text=True, timeout=600, cwd=CASES.parent.parent.parent,
    )
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None and int(passed.group(1)) == 17 and "failed" not in summary, summary
