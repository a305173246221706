"""Reading vLLM's source for contract checks, without `ast`.

CPython 3.11's AST converter never undoes its recursion counter when a conversion fails
(gh-106905): after one failed `ast.parse` anywhere in a process, every later one raises
"SystemError: AST constructor recursion depth mismatch". `inspect.getsource` of a *class* parses
its whole module with `ast` (to find the class), so a contract check that used it failed for
the rest of such a process. Functions and methods are found by line number, without `ast`;
classes are found here by their `class` line.
"""

from __future__ import annotations

import inspect
import re
import sys


def class_source(cls: type) -> str:
    """The source of a top-level class of a module: its `class` line up to the next top-level
    statement (decorators, comments at column 0 and blank lines do not end it)."""
    module = sys.modules[cls.__module__]
    lines = inspect.getsource(module).splitlines(keepends=True)
    header = re.compile(rf"class {re.escape(cls.__name__)}\b")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        raise OSError(f"no top-level `class {cls.__name__}` in {module.__name__}")
    end = start + 1
    while end < len(lines):
        line = lines[end]
        if line.strip() and not line.startswith((" ", "\t", "#", ")")):
            break
        end += 1
    return "".join(lines[start:end])
