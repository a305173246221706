"""Patch: check the adaptive keys of `vllm_xargs` on the JSON values the client sent.

vLLM types `vllm_xargs` as `dict[str, str | int | float | list[str | int | float]]`, and by the
time the plugin's admission hook (`AdaptiveLogitsProcessor.validate_params`) sees
`SamplingParams.extra_args`, pydantic has already changed what was sent: JSON `true` became the
int 1 (so `{"top_n_sigma": true}` was served as n = 1.0), an integer beyond 64 bits was refused
by vLLM as "extra_args integers must be ..." without naming the key, and `null` or an object
got a pydantic message about union branches. This patch puts a before-validator on the field of
the three OpenAI request models: it runs the plugin's request parser on the raw values and
raises `VLLMValidationError` (HTTP 400 naming the key, its allowed range and the value, counted
on `vllm_adaptive:rejected_requests_total`); every value it accepts goes on to vLLM's own
validation unchanged, and keys of other processors are not looked at.

Applied only in a process whose command line asks for the plugin (`--plugin adaptive`): plain
`vllm serve` keeps vLLM's behaviour. The API server builds its routes (`app.include_router` in
`build_app`) after general plugins are loaded, so they validate with the rebuilt models.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from typing import Annotated, Any, get_args, get_origin

from pydantic import BeforeValidator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

_FIELD = "vllm_xargs"
_MODELS: tuple[Any, ...] = (CompletionRequest, ChatCompletionRequest, ResponsesRequest)


def check_adaptive_xargs(value: Any) -> Any:
    """Refuse a request whose adaptive arguments are bad, as sent; return `value` unchanged."""
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive import metrics
    from vllm_adaptive.sampling.param_spec import SamplerParamError, shown
    from vllm_adaptive.sampling.params import parse_sampler_request

    from vllm_adaptive.kvcache.config import KVCompactionConfig
    from vllm_adaptive.kvcache.params import parse_request as parse_kv_request

    if isinstance(value, Mapping):
        try:
            parse_sampler_request(value)
            parse_kv_request(value, KVCompactionConfig())  # the values as sent; defaults are admission's
        except SamplerParamError as e:
            metrics.count_rejected(e.parameter)
            raise VLLMValidationError(str(e), parameter=e.parameter, value=shown(e.value)) from None
    return value


_VALIDATOR = BeforeValidator(check_adaptive_xargs)


def apply() -> None:
    if _asks_for_plugin(sys.argv):
        check_raw_values()


def _asks_for_plugin(argv: list[str]) -> bool:
    """Whether the command line has `--plugin adaptive` (or `--plugin=adaptive`)."""
    from vllm_adaptive.plugin import PLUGIN_NAME

    pairs = zip(argv, argv[1:])
    return f"--plugin={PLUGIN_NAME}" in argv or ("--plugin", PLUGIN_NAME) in pairs


def check_raw_values() -> None:
    """Put the before-validator on every request model's vllm_xargs (idempotent)."""
    for model in _MODELS:
        field = model.model_fields[_FIELD]
        if _VALIDATOR in field.metadata:
            continue
        field.metadata.append(_VALIDATOR)
        model.model_rebuild(force=True)


def revert() -> None:
    for model in _MODELS:
        field = model.model_fields[_FIELD]
        if _VALIDATOR in field.metadata:
            field.metadata.remove(_VALIDATOR)
            model.model_rebuild(force=True)


def check_contract() -> None:
    from vllm_adaptive.patches import PatchContractError

    for model in _MODELS:
        field = model.model_fields.get(_FIELD)
        if field is None:
            raise PatchContractError(f"{model.__name__} has no {_FIELD} field")
        annotation = field.annotation
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        if dict not in (get_origin(member) for member in get_args(annotation)):
            raise PatchContractError(f"{model.__name__}.{_FIELD} is no longer a dict: {field.annotation}")
        convert = getattr(model, "to_sampling_params", None)
        if convert is None or f"self.{_FIELD}" not in inspect.getsource(convert):
            raise PatchContractError(f"{model.__name__}.to_sampling_params no longer passes {_FIELD} on")
