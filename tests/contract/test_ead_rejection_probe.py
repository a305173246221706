"""The routing gate against vLLM's own `rejection_sample` (tests/contract/ead_rejection_probe_cases.py).

The cases bind vLLM's rejection kernels to the CPU build's C++ versions, as a worker does at
start (`register_triton_kernel_overrides`), which changes vLLM's modules for the rest of the
process: later contract checks in the same process then fail. So they run in their own pytest
process, and this test asserts that every case passed there.
"""

from __future__ import annotations

from pathlib import Path

from own_process import assert_all_pass_in_own_process

CASES = Path(__file__).with_name("ead_rejection_probe_cases.py")


def test_every_rejection_probe_case_passes_in_its_own_process() -> None:
    assert_all_pass_in_own_process(CASES, expected=17)
