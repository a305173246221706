"""Wrap one method of a class in a module that only some processes import (the V1 model runner
lives in workers): the mechanics shared by the patches that do this, each of which keeps its own
why, how, wrapper and contract check."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ._import_hook import OnImport

# Set on a wrapper: the method it replaced.
MARK = "__vllm_adaptive_original__"


def original_of(method: Any) -> Any:
    """vLLM's method behind `method` (itself when it is not our wrapper)."""
    return getattr(method, MARK, method)


class ClassMethodPatch:
    """`cls_name.method` of module `module_name` replaced by `wrap(original)` once the module is
    imported and `check_contract()` holds; a failure is recorded for the patch of module
    `patch_module` (never raised: it runs inside vLLM's import)."""

    def __init__(self, module_name: str, cls_name: str, method: str,
                 wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
                 check_contract: Callable[[], None], patch_module: str) -> None:
        self.module_name, self.cls_name, self.method = module_name, cls_name, method
        self._wrap, self._check_contract = wrap, check_contract
        self._patch_module = patch_module.rsplit(".", 1)[-1]
        self._hook = OnImport(module_name, self.rebind)

    def rebind(self, module: ModuleType) -> None:
        from vllm_adaptive.patches import PATCHES, record_failure

        spec = next(s for s in PATCHES if s.module == self._patch_module)
        try:
            cls = getattr(module, self.cls_name)
            current = vars(cls)[self.method]
            if hasattr(current, MARK):
                return
            self._check_contract()
            wrapper = self._wrap(current)
            setattr(wrapper, MARK, current)
            setattr(cls, self.method, wrapper)
        except Exception as e:  # noqa: BLE001 - never into vLLM's import
            record_failure(spec, e)

    def apply(self) -> None:
        self._hook.install()

    def revert(self) -> None:
        self._hook.uninstall()
        module = sys.modules.get(self.module_name)
        cls = getattr(module, self.cls_name, None) if module is not None else None
        current = vars(cls).get(self.method) if cls is not None else None
        original = getattr(current, MARK, None)
        if original is not None:
            setattr(cls, self.method, original)
