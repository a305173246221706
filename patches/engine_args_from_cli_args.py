"""Patch: turn `--plugin adaptive [--adaptive-config FILE]` into engine arguments."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any

from vllm.engine.arg_utils import EngineArgs

_MARK = "__vllm_adaptive_original__"
# Engine arguments engine_kwargs checks (and may set) for adaptive drafting.
CHECKED_ENGINE_ARGS = (
    "async_scheduling", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"
)


def opt_in(engine_args: Any, args: argparse.Namespace) -> Any:
    """Switch the plugin on for `engine_args` when `args` asks for it; otherwise leave it be."""
    from vllm_adaptive.config import AdaptiveConfig
    from vllm_adaptive.plugin import PLUGIN_NAME, engine_kwargs

    plugins = getattr(args, "plugin", None) or []
    config = getattr(args, "adaptive_config", None)
    if PLUGIN_NAME not in plugins:
        if config is not None:
            raise SystemExit(
                f"error: --adaptive-config needs --plugin {PLUGIN_NAME}; add `--plugin "
                f"{PLUGIN_NAME}` to switch vllm-adaptive on, or drop --adaptive-config"
            )
        return engine_args
    kwargs = engine_kwargs(
        config if isinstance(config, AdaptiveConfig) else None,
        additional_config=engine_args.additional_config,
        logits_processors=engine_args.logits_processors,
        speculative_config=engine_args.speculative_config,
        **{name: getattr(engine_args, name) for name in CHECKED_ENGINE_ARGS},
    )
    # Set in place: dataclasses.replace would run EngineArgs.__post_init__ a second time.
    for name, value in kwargs.items():
        setattr(engine_args, name, value)
    # This process serves /metrics: give the engine's workers a folder for their figures
    # (named in the environment, which the engine processes started after this inherit).
    from vllm_adaptive.worker_metrics import serve_worker_metrics

    serve_worker_metrics()
    return engine_args


def apply() -> None:
    current = EngineArgs.__dict__["from_cli_args"]
    if hasattr(current.__func__, _MARK):
        return
    original = current.__func__

    def from_cli_args(cls: type, args: argparse.Namespace) -> Any:
        return opt_in(original(cls, args), args)

    setattr(from_cli_args, _MARK, original)
    from_cli_args.__doc__ = original.__doc__
    EngineArgs.from_cli_args = classmethod(from_cli_args)  # type: ignore[method-assign,assignment]


def revert() -> None:
    current = EngineArgs.__dict__["from_cli_args"]
    original = getattr(current.__func__, _MARK, None)
    if original is not None:
        EngineArgs.from_cli_args = classmethod(original)  # type: ignore[method-assign,assignment]


def check_contract() -> None:
    from vllm_adaptive.patches import PatchContractError

    member = EngineArgs.__dict__.get("from_cli_args")
    if not isinstance(member, classmethod):
        raise PatchContractError("EngineArgs.from_cli_args is no longer a classmethod")
    original = getattr(member.__func__, _MARK, member.__func__)
    params = list(inspect.signature(original).parameters)
    if params != ["cls", "args"]:
        raise PatchContractError(f"EngineArgs.from_cli_args parameters changed: {params}")
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    needed = ("additional_config", "logits_processors", "speculative_config", *CHECKED_ENGINE_ARGS)
    for name in needed:
        if name not in fields:
            raise PatchContractError(f"EngineArgs has no field {name!r}; opt-in cannot set it")
