"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.

`@triton.jit` decides between compiling and interpreting when a module is imported, and vLLM
imports Triton early, so the interpreter must be on from the start of the process:
tests/test_kernels_interpreted.py runs this folder in a subprocess with TRITON_INTERPRET=1, and
tests/conftest.py collects it in the main session only when that session was started so.
"""

from __future__ import annotations

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "tests/kernels need TRITON_INTERPRET=1 set before Python starts: "
        "run `TRITON_INTERPRET=1 python -m pytest tests/kernels` (plain `pytest` does this for you)"
    )
