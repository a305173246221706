"""Parameters of adaptive draft length (issue #5): the stop rules, the calibrator, the controller.

`AdaptiveDraftConfig` is the `speculative` section of `AdaptiveConfig` (vllm_adaptive/config.py);
it is validated once, when it is built. Each bad value raises a `ConfigError` that starts with
the field name, so `config._build` can prefix the section ("adaptive.yaml:
speculative.entropy_threshold must be ..."). It imports neither torch nor vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vllm_adaptive.errors import ConfigError
from vllm_adaptive.sampling.param_spec import NumberParam, SamplerParamError

INF = math.inf

# Which rule ends a request's draft early ("none": only the controller's cap, K_max).
STOP_RULES = ("none", "entropy", "adaedl", "specdec")
# What the SpecDec++ rule calibrates: the draft's largest probability, or the drafted token's.
CONFIDENCES = ("top_prob", "token_prob")
# SpecDec++'s threshold from the draft's cost: theta = 1 - draft cost ratio.
AUTO = "auto"
# The draft cost ratio before the controller has measured one (or with the controller off).
DEFAULT_DRAFT_COST_RATIO = 0.1
_SPECDEC_THRESHOLD = NumberParam("specdec_threshold", 0.0, 1.0, "specdec_threshold", low_open=True, high_open=True)
_DRAFT_COST_RATIO = NumberParam("draft_cost_ratio", 0.0, 1.0, "draft_cost_ratio", low_open=True, high_open=True)
# The controller's K before it has measured step times (capped by max_draft_tokens).
DEFAULT_INITIAL_K = 4
# vLLM's rejection sampler verifies at most this many draft tokens per request
# (vllm/v1/sample/rejection_sampler.py MAX_SPEC_LEN).
MAX_DRAFT_TOKENS_LIMIT = 128

_FLOATS: tuple[NumberParam, ...] = (
    NumberParam("entropy_threshold", 0.0, INF, "entropy_threshold", low_open=True, high_open=True),
    NumberParam("adaedl_gamma", 0.0, INF, "adaedl_gamma", low_open=True, high_open=True),
    NumberParam("adaedl_lambda", 0.0, 1.0, "adaedl_lambda"),
    NumberParam("adaedl_target_acceptance", 0.0, 1.0, "adaedl_target_acceptance", low_open=True),
    NumberParam("adaedl_step", 0.0, 1.0, "adaedl_step"),
    NumberParam("adaedl_beta1", 0.0, 1.0, "adaedl_beta1", high_open=True),
    NumberParam("adaedl_beta2", 0.0, 1.0, "adaedl_beta2", high_open=True),
    NumberParam("calibration_prior", 0.0, INF, "calibration_prior", low_open=True, high_open=True),
    NumberParam("calibration_decay", 0.0, 1.0, "calibration_decay", low_open=True),
    NumberParam("controller_margin", 0.0, 1.0, "controller_margin"),
    NumberParam("controller_forget", 0.0, 1.0, "controller_forget", low_open=True),
)


@dataclasses.dataclass(frozen=True)
class AdaptiveDraftConfig:
    """Draft up to `max_draft_tokens` per request; stop each draft by `stop_rule`; cap by goodput.

    Entropies are in nats. Defaults: AdaEDL's are the paper's (gamma 0.2, beta1 0.5, beta2 0.9,
    step 0.01, target acceptance 0.9; its initial threshold is swept there, 0.7 here); the
    SpecDec++ threshold is a starting point for the benchmark to tune.
    """

    # Whether the deployment's draft-model speculation uses adaptive draft lengths at all.
    enabled: bool = False
    # The most draft tokens per request per step (vLLM's num_speculative_tokens).
    max_draft_tokens: int = 8
    # One of STOP_RULES.
    stop_rule: str = "specdec"
    # entropy: stop after a token whose draft distribution has entropy above this (nats).
    entropy_threshold: float = 2.0
    # adaedl: stop when 1 - sqrt(adaedl_gamma * H) < lambda; lambda starts at adaedl_lambda
    # and, when adaedl_adapt, follows the paper's Algorithm 1 per request.
    adaedl_gamma: float = 0.2
    adaedl_lambda: float = 0.7
    adaedl_adapt: bool = True
    adaedl_target_acceptance: float = 0.9
    adaedl_step: float = 0.01
    adaedl_beta1: float = 0.5
    adaedl_beta2: float = 0.9
    # specdec: stop when 1 - prod(a_i) > specdec_threshold, a_i calibrated from `confidence`.
    # "auto": the threshold is 1 - the draft cost ratio, so a request drafts one more token
    # while the estimated probability that its whole draft is accepted exceeds what that token
    # costs, relative to a step (cheap drafts draft further).
    specdec_threshold: float | str = AUTO
    # The cost of extending every request's draft by one token (one draft forward pass and
    # the extra verified tokens) relative to one decode step, for specdec_threshold "auto".
    # null: measured from the engine's step times by the controller (DEFAULT_DRAFT_COST_RATIO
    # until it has measured, or with the controller off); a number pins it, e.g. to model
    # another device.
    draft_cost_ratio: float | None = None
    confidence: str = "top_prob"
    # AcceptanceCalibrator: bins over confidence in [0, 1], prior pseudo-observations per bin
    # (prior mean: the bin's centre), and the factor applied to old counts per update.
    calibration_bins: int = 20
    calibration_prior: float = 2.0
    calibration_decay: float = 1.0
    # GoodputController: whether it caps K at all; switch only for a relative gain above
    # margin, seen on `patience` decisions in a row; K before `min_samples` timings; the
    # factor applied to old timings per observation.
    controller: bool = True
    controller_margin: float = 0.05
    controller_patience: int = 3
    controller_initial_k: int | None = None  # null: min(4, max_draft_tokens)
    controller_min_samples: int = 8
    controller_forget: float = 0.98

    def __post_init__(self) -> None:
        for param in _FLOATS:
            value = getattr(self, param.key)
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise SamplerParamError("not a number", param.key, value)
                param.parse(value)
            except SamplerParamError:
                raise ConfigError(
                    f"{param.key} must be a number in {param.interval()}, got {value!r}"
                ) from None
        if self.specdec_threshold != AUTO:
            _check_number(_SPECDEC_THRESHOLD, self.specdec_threshold, f"'{AUTO}' or a number")
        if self.draft_cost_ratio is not None:
            _check_number(_DRAFT_COST_RATIO, self.draft_cost_ratio, "null (measured) or a number")
        _check_int("max_draft_tokens", self.max_draft_tokens, 1, MAX_DRAFT_TOKENS_LIMIT)
        _check_int("calibration_bins", self.calibration_bins, 1, 10_000)
        _check_int("controller_patience", self.controller_patience, 1, 10_000)
        _check_int("controller_min_samples", self.controller_min_samples, 1, 10_000)
        if self.controller_initial_k is not None:
            _check_int(
                "controller_initial_k",
                self.controller_initial_k,
                0,
                self.max_draft_tokens,
                high_name=f"max_draft_tokens={self.max_draft_tokens}",
            )
        _check_choice("stop_rule", self.stop_rule, STOP_RULES)
        _check_choice("confidence", self.confidence, CONFIDENCES)


def initial_k(config: AdaptiveDraftConfig) -> int:
    """The controller's K before it has timings: controller_initial_k, or min(4, max_draft_tokens)."""
    if config.controller_initial_k is not None:
        return config.controller_initial_k
    return min(DEFAULT_INITIAL_K, config.max_draft_tokens)


def _check_number(param: NumberParam, value: Any, what: str) -> None:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SamplerParamError("not a number", param.key, value)
        param.parse(value)
    except SamplerParamError:
        raise ConfigError(f"{param.key} must be {what} in {param.interval()}, got {value!r}") from None


def _check_int(key: str, value: Any, low: int, high: int, high_name: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"{key} must be an integer in [{low}, {high_name or high}], got {value!r}"
        )


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
