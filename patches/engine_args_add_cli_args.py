"""Patch: add `--plugin` and `--adaptive-config` to vLLM's engine argument parser."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

_MARK = "__vllm_adaptive_original__"
PLUGIN_FLAG = "--plugin"
CONFIG_FLAG = "--adaptive-config"


def _adaptive_config_file(path: str) -> Any:
    """argparse type: parse and validate the YAML file, so a bad key fails at start-up."""
    from vllm_adaptive.config import AdaptiveConfig, ConfigError

    try:
        return AdaptiveConfig.from_file(path)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_adaptive_arguments(parser: argparse.ArgumentParser) -> None:
    if PLUGIN_FLAG in parser._option_string_actions:  # already added to this parser
        return
    from vllm_adaptive.plugin import PLUGIN_NAME

    group = parser.add_argument_group(
        "vllm-adaptive",
        "Entropy-adaptive decoding from the vllm-adaptive package. Nothing changes unless "
        f"`{PLUGIN_FLAG} {PLUGIN_NAME}` is given.",
    )
    group.add_argument(
        PLUGIN_FLAG,
        action="append",
        choices=[PLUGIN_NAME],
        default=None,
        help=f"Switch on an installed plugin set; `{PLUGIN_NAME}` is vllm-adaptive.",
    )
    group.add_argument(
        CONFIG_FLAG,
        type=_adaptive_config_file,
        default=None,
        metavar="FILE",
        help=f"YAML config for vllm-adaptive (needs `{PLUGIN_FLAG} {PLUGIN_NAME}`). See README.",
    )


def apply() -> None:
    current = EngineArgs.__dict__["add_cli_args"]
    if hasattr(current.__func__, _MARK):
        return
    original = current.__func__

    def add_cli_args(parser: Any, *args: Any, **kwargs: Any) -> Any:
        parser = original(parser, *args, **kwargs)
        add_adaptive_arguments(parser)
        return parser

    setattr(add_cli_args, _MARK, original)
    add_cli_args.__doc__ = original.__doc__
    EngineArgs.add_cli_args = staticmethod(add_cli_args)  # type: ignore[method-assign]


def revert() -> None:
    current = EngineArgs.__dict__["add_cli_args"]
    original = getattr(current.__func__, _MARK, None)
    if original is not None:
        EngineArgs.add_cli_args = staticmethod(original)  # type: ignore[method-assign]


def check_contract() -> None:
    from vllm_adaptive.patches import PatchContractError

    member = EngineArgs.__dict__.get("add_cli_args")
    if not isinstance(member, staticmethod):
        raise PatchContractError("EngineArgs.add_cli_args is no longer a staticmethod")
    original = getattr(member.__func__, _MARK, member.__func__)
    params = list(inspect.signature(original).parameters)
    if params != ["parser"]:
        raise PatchContractError(f"EngineArgs.add_cli_args parameters changed: {params}")
    # The wrapper must be in place before the serve parser is built: vLLM loads general
    # plugins inside AsyncEngineArgs.add_cli_args, before it calls EngineArgs.add_cli_args.
    source = inspect.getsource(AsyncEngineArgs.add_cli_args)
    plugins_at = source.find("load_general_plugins()")
    engine_at = source.find("EngineArgs.add_cli_args(parser)")
    if plugins_at < 0 or engine_at < 0 or plugins_at > engine_at:
        raise PatchContractError(
            "AsyncEngineArgs.add_cli_args no longer loads general plugins before "
            "EngineArgs.add_cli_args; --plugin would not reach the serve parser"
        )
