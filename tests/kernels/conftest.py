"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

`@triton.jit` decides between compiling and interpreting when a kernel module is imported, so
TRITON_INTERPRET=1 is set before the kernel modules are (re)imported here: a kernel module that
another test file imported earlier in the same session was decorated in compiled mode and is
reloaded. The interpreter also reads the variable while a kernel runs, so each kernel test sets
it again (autouse fixture). Outside these moments it is unset, so processes that other tests
start (vLLM engines and servers) do not inherit it.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import pytest

KERNEL_MODULES = ("vllm_adaptive.kernels.row_stats", "vllm_adaptive.kernels.threshold_mask")

_previous = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton  # noqa: F401  (first imported with the variable set)

    for _name in KERNEL_MODULES:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
        else:
            importlib.import_module(_name)
finally:
    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
