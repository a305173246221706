"""Run a callback right after a module is imported: how patches reach modules that only some
processes import (the V1 runner and its sampler live in workers), without importing them in
the API server or the engine core on the plugin's account."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any


class OnImport(importlib.abc.MetaPathFinder):
    """`install()` runs `callback(module)` at once if `name` is imported, else right after its
    import (a one-shot finder at the front of sys.meta_path, removed when it fires)."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.callback = callback
        self._lock = threading.Lock()

    def install(self) -> None:
        module = sys.modules.get(self.name)
        if module is not None:
            self.callback(module)
            return
        with self._lock:
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        with self._lock:
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        self.uninstall()
        spec = importlib.util.find_spec(fullname)  # the real one, from the remaining finders
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenCall(spec.loader, self.callback)
        return spec


class _ThenCall(importlib.abc.Loader):
    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real loader
        return getattr(self._loader, name)
