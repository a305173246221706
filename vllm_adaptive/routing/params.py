"""Per-request EAD arguments: the keys requests send, their ranges, and their parsing.

Requests opt in with flat keys in `SamplingParams.extra_args` (over HTTP: `vllm_xargs`), e.g.
`{"ead": true, "ead_tau": 2.0}`; every knob left out takes the deployment's default from the
`routing:` section (vllm_adaptive.routing.config). `vllm_xargs` carries strings and numbers
only, and pydantic turns a JSON `true` into the integer 1 before the engine sees it, so `ead`
reads true/false, "true"/"false" and 1/0; numbers follow `param_spec.as_number` ("2.5" is 2.5,
`true` is not a number). A bad value raises `SamplerParamError` naming the key, what is allowed
and the value sent; admission turns it into HTTP 400.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vllm_adaptive.routing.config import MAX_MIN_STINT, ROUTING_MODES, RoutingConfig
from vllm_adaptive.sampling.param_spec import SamplerParamError, as_number, shown

ENABLE_KEY = "ead"
ROUTING_KEYS = ("ead", "ead_tau", "ead_window", "ead_min_stint", "ead_mode")


@dataclasses.dataclass(frozen=True)
class RequestRouting:
    """The EAD knobs of one request, validated, with the deployment's defaults filled in."""

    tau: float
    window: int
    min_stint: int
    mode: str


def sent_routing_keys(extra_args: Mapping[str, Any] | None) -> list[str]:
    """The EAD keys a request sent, in ROUTING_KEYS order."""
    if not extra_args:
        return []
    return [key for key in ROUTING_KEYS if key in extra_args]


def parse_request(
    extra_args: Mapping[str, Any] | None, config: RoutingConfig
) -> RequestRouting | None:
    """The request's EAD knobs, or None when it does not use EAD.

    None: `ead` is false, or absent while `config.default_on` is false and no other ead_* key
    was sent. Any ead_* key other than `ead` turns EAD on; sent with `ead: false` it is a
    contradiction, refused naming `ead`. `config.enabled` is not looked at: whether the
    deployment serves EAD at all is the caller's question. Raises SamplerParamError.
    """
    extra_args = extra_args or {}
    knobs = [key for key in sent_routing_keys(extra_args) if key != ENABLE_KEY]
    if ENABLE_KEY in extra_args:
        value = extra_args[ENABLE_KEY]
        if not _parse_switch(value):
            if knobs:
                raise SamplerParamError(
                    f"{ENABLE_KEY} is false but the request also sets {knobs}: send {ENABLE_KEY}: "
                    f"true (or leave it out) to use EAD with them, or drop them",
                    ENABLE_KEY,
                    value,
                )
            return None
    elif not knobs and not config.default_on:
        return None
    window = extra_args.get("ead_window", config.window)
    min_stint = extra_args.get("ead_min_stint", config.min_stint)
    return RequestRouting(
        tau=_parse_tau(extra_args.get("ead_tau", config.tau)),
        window=_parse_int("ead_window", window, 1, config.max_window),
        min_stint=_parse_int("ead_min_stint", min_stint, 0, MAX_MIN_STINT),
        mode=_parse_mode(extra_args.get("ead_mode", config.mode)),
    )


def _parse_switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    number = as_number(value)
    if number in (0.0, 1.0) and not isinstance(value, str):
        return number == 1.0
    raise SamplerParamError(
        f"{ENABLE_KEY} must be true or false (also \"true\"/\"false\", 1/0), got {shown(value)}",
        ENABLE_KEY,
        value,
    )


def _parse_tau(value: Any) -> float:
    number = as_number(value)
    if number is None or number <= 0:
        raise SamplerParamError(
            f"ead_tau must be a number in (0, inf) bits, got {shown(value)}", "ead_tau", value
        )
    return number


def _parse_int(key: str, value: Any, low: int, high: int) -> int:
    number = as_number(value)
    if number is None or not number.is_integer() or not low <= number <= high:
        raise SamplerParamError(
            f"{key} must be an integer in [{low}, {high}], got {shown(value)}", key, value
        )
    return int(number)


def _parse_mode(value: Any) -> str:
    if value not in ROUTING_MODES:
        raise SamplerParamError(
            f"ead_mode must be one of {list(ROUTING_MODES)}, got {shown(value)}", "ead_mode", value
        )
    return value
