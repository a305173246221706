"""Patch: admission checks for what the plugin's processor cannot check on speculating engines.

vLLM's V1 runner does not run custom logits processors under speculative decoding, so the
plugin does not load its processor on such deployments, and with it goes the processor's
`validate_params` admission hook. Without this patch a request naming `adaptive_sampler` would
be served with plain sampling, silently. The wrapper runs vLLM's own checks first, then, only
for engines that run `--plugin adaptive` with a speculative config, answers such requests with
a validation error (HTTP 400 over the API) that says why.

It also admits Entropy Adaptive Decoding (EAD) requests (`ead`, `ead_*` in extra_args, or every
request where `routing.default_on`), on every engine that runs the plugin: it refuses them,
naming the parameter, where the deployment does not serve EAD, where a value is bad
(vllm_adaptive.routing.params), and where the small model would not follow the request's
sampling options (the draft sampler uses the temperature only:
vllm/v1/spec_decode/llm_base_proposer.py, compute_probs_and_sample_next_token), since the
small model's tokens are accepted unverified.

And KV compaction's keys (`kv_budget`, `kv_policy`, `kv_sinks`, `kv_buffer`): refused, naming the
parameter, where the deployment does not compact (kvcache.enabled false, or the plugin off) and
where a value is bad (vllm_adaptive.kvcache.params).
"""

from __future__ import annotations

import inspect
from typing import Any, NoReturn

from vllm.v1.engine.input_processor import InputProcessor

from ._source import class_source

_MARK = "__vllm_adaptive_original__"


def refuse_samplers_under_speculation(processor: Any, params: Any) -> None:
    """Raise VLLMValidationError if `params` asks for an adaptive sampler on a speculating engine."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive import metrics
    from vllm_adaptive.config import ADDITIONAL_CONFIG_KEY
    from vllm_adaptive.sampling.params import ALL_PARAM_KEYS, SAMPLER_KEY

    vllm_config = processor.vllm_config
    adaptive = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if adaptive is None or vllm_config.speculative_config is None:
        return
    if not isinstance(params, SamplingParams):
        return
    extra = params.extra_args or {}
    ours = sorted(({SAMPLER_KEY} | ALL_PARAM_KEYS).intersection(extra))
    counting = _config_of(adaptive).metrics.enabled
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


def refuse_unservable_routing(processor: Any, params: Any) -> None:
    """Raise VLLMValidationError if `params` asks for EAD where it cannot be honoured.

    Looked at: requests with an EAD key, and every request where routing.default_on. Requests
    that do not use EAD (no key and default_on false, or `ead: false` alone) pass untouched.
    """
    from vllm import SamplingParams

    from vllm_adaptive.config import ADDITIONAL_CONFIG_KEY
    from vllm_adaptive.routing.params import ENABLE_KEY, parse_request, sent_routing_keys
    from vllm_adaptive.sampling.param_spec import SamplerParamError

    vllm_config = processor.vllm_config
    adaptive = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    if adaptive is None or not isinstance(params, SamplingParams):
        return
    extra = params.extra_args or {}
    sent = sent_routing_keys(extra)
    routing = _config_of(adaptive).routing
    if not sent and not routing.default_on:
        return
    if not routing.enabled:  # default_on needs enabled, so the request sent a key
        try:
            opted_out = parse_request(extra, routing) is None  # `ead: false` alone: served anywhere
        except SamplerParamError:
            opted_out = False  # a bad value: the deployment's refusal below says more
        if opted_out:
            return
        key = sent[0]
        _refuse(key, extra[key], f"{key}={extra[key]!r} cannot be served here: this deployment "
                "does not serve Entropy Adaptive Decoding (routing.enabled is false in its "
                "adaptive config). Send the request without the ead_* keys, or use a deployment "
                "with routing.enabled: true.")
    try:
        request = parse_request(extra, routing)
    except SamplerParamError as e:
        _refuse(e.parameter, e.value, str(e))
    if request is None:
        return
    speculative_config = vllm_config.speculative_config
    if speculative_config is None or getattr(speculative_config, "method", None) != "draft_model":
        # Start-up refuses this (vllm_adaptive.routing.compatibility); an engine built around
        # engine_kwargs may still get here.
        key = sent[0] if sent else ENABLE_KEY
        _refuse(key, extra.get(key, True), f"{key}={extra.get(key, True)!r} cannot be served here: "
                "this deployment runs no draft-model speculation, which Entropy Adaptive Decoding "
                "needs. Send the request without the ead_* keys.")
    found = _unhonoured_options(params, speculative_config)
    if found:
        why = "; ".join(f"{name}={option!r}: {reason}" for name, option, reason in found)
        opted = (
            f"it sends {sent}" if sent else
            f"this deployment uses EAD for every request that does not send {ENABLE_KEY}: false"
        )
        _refuse(found[0][0], found[0][1],
                f"this request uses Entropy Adaptive Decoding ({opted}), which accepts the small "
                f"model's tokens unverified, so the small model must follow the request's sampling "
                f"options, and here it would not: {why}. Change these options, or send "
                f"{ENABLE_KEY}: false.")


def refuse_unservable_kv(processor: Any, params: Any) -> None:
    """Raise VLLMValidationError (HTTP 400, naming the parameter) if `params` sends a KV
    compaction key (kv_budget, ...) that this deployment cannot serve or that has a bad value."""
    from vllm import SamplingParams

    from vllm_adaptive.config import ADDITIONAL_CONFIG_KEY
    from vllm_adaptive.kvcache.params import parse_request, sent_kv_keys
    from vllm_adaptive.sampling.param_spec import SamplerParamError

    if not isinstance(params, SamplingParams):
        return
    extra = params.extra_args or {}
    sent = sent_kv_keys(extra)
    if not sent:
        return
    vllm_config = processor.vllm_config
    adaptive = (getattr(vllm_config, "additional_config", None) or {}).get(ADDITIONAL_CONFIG_KEY)
    kvcache = _config_of(adaptive).kvcache if adaptive is not None else None
    if kvcache is None or not kvcache.enabled:
        key = sent[0]
        _refuse(key, extra[key], f"{key}={extra[key]!r} cannot be served here: this deployment does not "
                "compact KV caches (kvcache.enabled is false in its --adaptive-config, or the plugin is "
                "off). Send the request without the kv_* keys, or use a deployment with kvcache.enabled: true.")
    try:
        parse_request(extra, kvcache)
    except SamplerParamError as e:
        _refuse(e.parameter, e.value, str(e))


def _refuse(parameter: str, value: Any, message: str) -> NoReturn:
    from vllm.exceptions import VLLMValidationError

    from vllm_adaptive import metrics

    metrics.count_rejected(parameter)
    raise VLLMValidationError(message, parameter=parameter, value=value)


def _unhonoured_options(params: Any, speculative_config: Any) -> list[tuple[str, Any, str]]:
    """(option, value, why) for each of the request's sampling options the small model would
    not follow on this deployment; empty when it follows them all."""
    from vllm.sampling_params import SamplingType

    found = []
    # The draft model writes its argmax (greedy) or a plain temperature sample: penalties never
    # reach it, so even a greedy request's small tokens would ignore them.
    for name, neutral in _PENALTIES:
        value = getattr(params, name)
        if value != neutral:
            found.append((name, value, f"the small model ignores penalties (send {neutral})"))
    if params.logit_bias:
        found.append(("logit_bias", params.logit_bias,
                      "the small model ignores logit biases (leave it out; to ban tokens, send "
                      "bad_words or allowed_token_ids, which EAD honours)"))
    if params.sampling_type == SamplingType.GREEDY:
        return found  # vLLM resets top_k, top_p and min_p; a seed changes nothing
    if getattr(speculative_config, "draft_sample_method", "greedy") == "greedy":
        found.insert(0, (
            "temperature", params.temperature,
            "the deployment's small model drafts greedily (speculative_config "
            "draft_sample_method is 'greedy'), so it would write its argmax, not a sample; send "
            "temperature 0, or use a deployment with draft_sample_method 'probabilistic'",
        ))
    full = "the small model samples from its full distribution"
    if params.top_k not in (0, -1):
        found.append(("top_k", params.top_k, f"{full} (send 0)"))
    if params.top_p < 1.0:
        found.append(("top_p", params.top_p, f"{full} (send 1)"))
    if params.min_p > 0.0:
        found.append(("min_p", params.min_p, f"{full} (send 0)"))
    if params.seed is not None:
        found.append(("seed", params.seed, "the small model's samples are not seeded (leave it out)"))
    return found


# SamplingParams' penalties and their neutral values (vllm/sampling_params.py).
_PENALTIES = (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0))
# The last deployment config parsed here, by the identity of its additional_config entry: every
# request of an engine carries the same one, so it is built once, not per request.
_parsed: tuple[Any, Any] | None = None


def _config_of(adaptive: Any) -> Any:
    """The AdaptiveConfig of an engine's additional_config["adaptive"]."""
    from vllm_adaptive.config import AdaptiveConfig

    global _parsed
    cached = _parsed
    if cached is not None and cached[0] is adaptive:
        return cached[1]
    config = AdaptiveConfig.from_dict(adaptive)
    _parsed = (adaptive, config)
    return config


def apply() -> None:
    current = InputProcessor.__dict__["_validate_params"]
    if hasattr(current, _MARK):
        return
    original = current

    def _validate_params(self: InputProcessor, params: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, params, *args, **kwargs)
        refuse_samplers_under_speculation(self, params)
        refuse_unservable_routing(self, params)
        refuse_unservable_kv(self, params)
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
    source = class_source(InputProcessor)
    if "self._validate_params(" not in source:
        raise PatchContractError("InputProcessor no longer calls _validate_params on admission")
    for attribute in ("vllm_config",):
        init = inspect.getsource(InputProcessor.__init__)
        if f"self.{attribute} =" not in init:
            raise PatchContractError(f"InputProcessor no longer keeps self.{attribute}")
