"""The `routing:` section of `AdaptiveConfig`: Entropy Adaptive Decoding (EAD, arXiv 2502.06833).

On a deployment with vLLM's draft-model speculation, a request that opts in has the small
(draft) model's tokens accepted unverified while the rolling mean entropy of the small model is
at most `tau` bits, and the large (target) model writes otherwise. The fields here are the
deployment's switch and the defaults of the per-request knobs (vllm_adaptive.routing.params).
Each bad value raises a `ConfigError` that starts with the field name, so `config._build`
prefixes the section ("adaptive.yaml: routing.tau must be ..."). It imports neither torch nor
vLLM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from vllm_adaptive.errors import ConfigError
from vllm_adaptive.sampling.param_spec import shown

# How the large model writes the positions it owns. faithful: it decodes them itself, one pass
# each, as in the paper; speculative: the small model drafts them too and the large model
# verifies the drafts (lossless), so a large stint costs fewer large-model passes.
ROUTING_MODES = ("faithful", "speculative")
# The largest `ead_min_stint` (d_min): positions a mode holds before it may switch.
MAX_MIN_STINT = 1024
# The largest `max_window` a deployment may allow (the machine keeps a [rows, max_window] window).
MAX_WINDOW_LIMIT = 256
# The largest `large_draft_tokens` (vLLM verifies at most 128 draft tokens per request).
MAX_LARGE_DRAFT_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class RoutingConfig:
    """Whether the deployment serves EAD requests, and the defaults of their knobs."""

    # The deployment serves EAD requests at all (needs draft-model speculation).
    enabled: bool = False
    # Requests that do not send `ead` use EAD (they opt out with `ead: false`).
    default_on: bool = False
    # Default ead_tau: the small model writes while its mean entropy is <= tau (bits).
    tau: float = 1.5
    # Default ead_window: how many of the latest entropies the mean covers.
    window: int = 5
    # Default ead_min_stint: positions a mode holds before it may switch (d_min).
    min_stint: int = 0
    # Default ead_mode, one of ROUTING_MODES.
    mode: str = "speculative"
    # The largest ead_window a request may ask for.
    max_window: int = 32
    # Speculative mode: a request's draft ends at its `large_draft_tokens`-th LARGE position
    # (the large model verifies those); null: every draft runs to K. With a long K, the small
    # model's stints are drafted far (they are accepted without verification) while the large
    # model's are not drafted past what it is likely to accept. The output does not depend on
    # it except at draft ends (the position after a draft that ends LARGE is the large model's).
    large_draft_tokens: int | None = None
    # A step's draft loop ends once fewer than this fraction of its EAD rows still draft (the
    # loop's draft passes run over every row of the batch, drafting or not); 0: it runs while
    # any row drafts, to K. A row cut short keeps what it drafted and goes on at the next step.
    # With a long K and many requests at once, the last rows' long small-model stints would
    # otherwise hold every row's pass to K. Ends the loop on a CPU device only (the check is a
    # read of the device), and only in steps where every decoding row uses EAD with a draft end
    # of its own (faithful, or speculative with large_draft_tokens).
    min_drafting_fraction: float = 0.0

    def __post_init__(self) -> None:
        for key in ("enabled", "default_on"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, got {shown(value)}")
        if self.default_on and not self.enabled:
            raise ConfigError(
                "default_on needs enabled: true (requests cannot use EAD by default on a "
                "deployment that does not serve it); set routing.enabled: true or drop default_on"
            )
        tau = self.tau
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0 < tau < math.inf):
            raise ConfigError(f"tau must be a number in (0, inf) bits, got {shown(tau)}")
        _check_int("max_window", self.max_window, 1, MAX_WINDOW_LIMIT)
        _check_int("window", self.window, 1, self.max_window,
                   high_name=f"max_window={self.max_window}")
        _check_int("min_stint", self.min_stint, 0, MAX_MIN_STINT)
        if self.mode not in ROUTING_MODES:
            raise ConfigError(f"mode must be one of {list(ROUTING_MODES)}, got {shown(self.mode)}")
        if self.large_draft_tokens is not None:
            _check_int("large_draft_tokens", self.large_draft_tokens, 1, MAX_LARGE_DRAFT_TOKENS,
                       suffix=" or null")
        fraction = self.min_drafting_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ConfigError(f"min_drafting_fraction must be a number in [0, 1], got {shown(fraction)}")


def _check_int(key: str, value: Any, low: int, high: int, high_name: str | None = None,
               suffix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(
            f"{key} must be an integer in [{low}, {high_name or high}]{suffix}, got {shown(value)}"
        )
