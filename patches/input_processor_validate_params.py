"""Patch: refuse adaptive samplers at admission when the deployment runs speculative decoding.

vLLM's V1 runner does not run custom logits processors under speculative decoding, so the
plugin does not load its processor on such deployments, and with it goes the processor's
`validate_params` admission hook. Without this patch a request naming `adaptive_sampler` would
be served with plain sampling, silently. The wrapper runs vLLM's own checks first, then, only
for engines that run `--plugin adaptive` with a speculative config, answers such requests with
a validation error (HTTP 400 over the API) that says why.
"""

from __future__ import annotations

import inspect
from typing import Any

from vllm.v1.engine.input_processor import InputProcessor

_MARK = "__vllm_adaptive_original__"


def refuse_samplers_under_speculation(processor: Any, params: Any) -> None:
    """Raise VLLMValidationError if `params` asks for an adaptive sampler on a speculating engine."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive import metrics
    from vllm_adaptive.config import ADDITIONAL_CONFIG_KEY, AdaptiveConfig
    from vllm_adaptive.sampling.params import ALL_PARAM_KEYS, SAMPLER_KEY

    vllm_config = processor.vllm_config
    adaptive = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if adaptive is None or vllm_config.speculative_config is None:
        return
    if not isinstance(params, SamplingParams):
        return
    extra = params.extra_args or {}
    ours = sorted(({SAMPLER_KEY} | ALL_PARAM_KEYS).intersection(extra))
    counting = AdaptiveConfig.from_dict(adaptive).metrics.enabled
    if not ours:
        if counting:
            metrics.count_request("none")
        return
    key = SAMPLER_KEY if SAMPLER_KEY in ours else ours[0]
    metrics.count_rejected(key)
    raise VLLMValidationError(
        f"{key}={extra[key]!r} cannot be served here: this deployment runs speculative decoding "
        "(--speculative-config), and vLLM does not run per-request logits processors on "
        "speculative steps, so adaptive samplers are off on it. Send the request without "
        f"{SAMPLER_KEY} and its parameters, or use a deployment without speculative decoding.",
        parameter=key,
        value=extra[key],
    )


def apply() -> None:
    current = InputProcessor.__dict__["_validate_params"]
    if hasattr(current, _MARK):
        return
    original = current

    def _validate_params(self: InputProcessor, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, params, *args, **kwargs)
        refuse_samplers_under_speculation(self, params)
        return result

    setattr(_validate_params, _MARK, original)
    _validate_params.__doc__ = original.__doc__
    InputProcessor._validate_params = _validate_params  # type: ignore[method-assign]


def revert() -> None:
    original = getattr(InputProcessor.__dict__["_validate_params"], _MARK, None)
    if original is not None:
        InputProcessor._validate_params = original  # type: ignore[method-assign]


def check_contract() -> None:
    from vllm_adaptive.patches import PatchContractError

    member = InputProcessor.__dict__.get("_validate_params")
    if member is None or not callable(member):
        raise PatchContractError("InputProcessor._validate_params is gone; admission has moved")
    original = getattr(member, _MARK, member)
    params = list(inspect.signature(original).parameters)
    if params[:2] != ["self", "params"]:
        raise PatchContractError(f"InputProcessor._validate_params parameters changed: {params}")
    source = inspect.getsource(InputProcessor)
    if "self._validate_params(" not in source:
        raise PatchContractError("InputProcessor no longer calls _validate_params on admission")
    for attribute in ("vllm_config",):
        init = inspect.getsource(InputProcessor.__init__)
        if f"self.{attribute} =" not in init:
            raise PatchContractError(f"InputProcessor no longer keeps self.{attribute}")
