"""Simulates a vLLM whose internals moved, for tests/contract/test_fail_closed.py.

Put this folder on PYTHONPATH and set VLLM_ADAPTIVE_TEST_RENAME="module:old:new": when `module`
is imported, every occurrence of the identifier `old` in its source is renamed to `new` before
the module runs, as a refactor upstream would rename a method together with its call sites.
vLLM itself keeps working; a patch that looks for `old` no longer finds it. Every process the
variable reaches (API server, engine core, workers) sees the same renamed vLLM.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys

_SPEC = os.environ.get("VLLM_ADAPTIVE_TEST_RENAME", "")


class _RenamingLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, old: str, new: str) -> None:
        super().__init__(fullname, path)
        self.old, self.new = old, new

    def get_data(self, path: str) -> bytes:
        data = super().get_data(path)
        if path.endswith(".py"):
            text = re.sub(rf"\b{re.escape(self.old)}\b", self.new, data.decode())
            return text.encode()
        return data

    def get_code(self, fullname: str):  # noqa: ANN201 - never the cached bytecode
        source = self.get_data(self.get_filename(fullname))
        return compile(source, self.get_filename(fullname), "exec", dont_inherit=True)


class _RenamingFinder(importlib.abc.MetaPathFinder):
    def __init__(self, module: str, old: str, new: str) -> None:
        self.module, self.old, self.new = module, old, new

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201
        if fullname != self.module:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                loader = _RenamingLoader(fullname, spec.origin, self.old, self.new)
                return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader)
        return None


if _SPEC:
    _module, _old, _new = _SPEC.split(":")
    sys.meta_path.insert(0, _RenamingFinder(_module, _old, _new))
