"""Per-request EAD knobs (`ead`, `ead_tau`, `ead_window`, `ead_min_stint`, `ead_mode` in
extra_args): who uses EAD, the deployment's defaults, and errors that name key, range and value."""

from __future__ import annotations

from typing import Any

import pytest

from vllm_adaptive.routing.config import RoutingConfig
from vllm_adaptive.routing.params import ROUTING_KEYS, RequestRouting, parse_request
from vllm_adaptive.sampling.param_spec import SamplerParamError

SERVING = RoutingConfig(enabled=True, tau=2.0, window=4, min_stint=3, mode="faithful", max_window=16)
DEFAULTS = RequestRouting(tau=2.0, window=4, min_stint=3, mode="faithful")
DEFAULT_ON = RoutingConfig(enabled=True, default_on=True)


def test_the_keys() -> None:
    assert ROUTING_KEYS == ("ead", "ead_tau", "ead_window", "ead_min_stint", "ead_mode")


@pytest.mark.parametrize("extra_args", [None, {}, {"other_key": 1}, {"adaptive_sampler": "typical"}])
def test_requests_without_ead_keys_do_not_use_ead(extra_args: dict | None) -> None:
    assert parse_request(extra_args, SERVING) is None


@pytest.mark.parametrize("value", [True, "true", "TRUE", 1, 1.0])
def test_ead_true_uses_the_deployment_defaults(value: Any) -> None:
    # 1: pydantic turns a JSON `true` in vllm_xargs into the integer 1.
    assert parse_request({"ead": value}, SERVING) == DEFAULTS


@pytest.mark.parametrize("value", [False, "false", "False", 0, 0.0])
def test_ead_false_opts_out(value: Any) -> None:
    assert parse_request({"ead": value}, SERVING) is None
    assert parse_request({"ead": value}, DEFAULT_ON) is None


def test_default_on_applies_to_requests_without_ead() -> None:
    assert parse_request({}, DEFAULT_ON) == RequestRouting(tau=1.5, window=5, min_stint=0, mode="speculative")
    assert parse_request(None, DEFAULT_ON) == RequestRouting(tau=1.5, window=5, min_stint=0, mode="speculative")


@pytest.mark.parametrize(
    ("extra_args", "expected"),
    [
        ({"ead_tau": 0.5}, RequestRouting(tau=0.5, window=4, min_stint=3, mode="faithful")),
        ({"ead_tau": "0.25"}, RequestRouting(tau=0.25, window=4, min_stint=3, mode="faithful")),
        ({"ead_tau": 3}, RequestRouting(tau=3.0, window=4, min_stint=3, mode="faithful")),
        ({"ead_window": 16}, RequestRouting(tau=2.0, window=16, min_stint=3, mode="faithful")),
        ({"ead_window": 3.0}, RequestRouting(tau=2.0, window=3, min_stint=3, mode="faithful")),
        ({"ead_window": "3"}, RequestRouting(tau=2.0, window=3, min_stint=3, mode="faithful")),
        ({"ead_min_stint": 0}, RequestRouting(tau=2.0, window=4, min_stint=0, mode="faithful")),
        ({"ead_min_stint": "1024"}, RequestRouting(tau=2.0, window=4, min_stint=1024, mode="faithful")),
        ({"ead_mode": "speculative"}, RequestRouting(tau=2.0, window=4, min_stint=3, mode="speculative")),
        ({"ead": True, "ead_tau": 1, "ead_window": 1, "ead_min_stint": 7, "ead_mode": "speculative"},
         RequestRouting(tau=1.0, window=1, min_stint=7, mode="speculative")),
    ],
)
def test_any_knob_turns_ead_on_and_overrides_its_default(extra_args: dict, expected: RequestRouting) -> None:
    assert parse_request(extra_args, SERVING) == expected


def test_parsed_numbers_have_the_field_types() -> None:
    routing = parse_request({"ead_tau": "2", "ead_window": 2.0, "ead_min_stint": "5"}, SERVING)
    assert routing is not None
    assert type(routing.tau) is float and type(routing.window) is int and type(routing.min_stint) is int


@pytest.mark.parametrize(
    ("extra_args", "parameter", "message"),
    [
        ({"ead": "yes"}, "ead", "ead must be true or false (also \"true\"/\"false\", 1/0), got 'yes'"),
        ({"ead": 2}, "ead", "ead must be true or false (also \"true\"/\"false\", 1/0), got 2"),
        ({"ead": "1"}, "ead", "ead must be true or false (also \"true\"/\"false\", 1/0), got '1'"),
        ({"ead": None}, "ead", "ead must be true or false (also \"true\"/\"false\", 1/0), got None"),
        ({"ead_tau": -1}, "ead_tau", "ead_tau must be a number in (0, inf) bits, got -1"),
        ({"ead_tau": 0}, "ead_tau", "ead_tau must be a number in (0, inf) bits, got 0"),
        ({"ead_tau": "nan"}, "ead_tau", "ead_tau must be a number in (0, inf) bits, got 'nan'"),
        ({"ead_tau": float("inf")}, "ead_tau", "ead_tau must be a number in (0, inf) bits, got inf"),
        ({"ead_tau": True}, "ead_tau", "ead_tau must be a number in (0, inf) bits, got True"),
        ({"ead_tau": [1.0]}, "ead_tau", "ead_tau must be a number in (0, inf) bits, got [1.0]"),
        ({"ead_window": 3.5}, "ead_window", "ead_window must be an integer in [1, 16], got 3.5"),
        ({"ead_window": "3.5"}, "ead_window", "ead_window must be an integer in [1, 16], got '3.5'"),
        ({"ead_window": 0}, "ead_window", "ead_window must be an integer in [1, 16], got 0"),
        ({"ead_window": 17}, "ead_window", "ead_window must be an integer in [1, 16], got 17"),
        ({"ead_window": "three"}, "ead_window", "ead_window must be an integer in [1, 16], got 'three'"),
        ({"ead_window": True}, "ead_window", "ead_window must be an integer in [1, 16], got True"),
        ({"ead_min_stint": -1}, "ead_min_stint", "ead_min_stint must be an integer in [0, 1024], got -1"),
        ({"ead_min_stint": 1025}, "ead_min_stint", "ead_min_stint must be an integer in [0, 1024], got 1025"),
        ({"ead_min_stint": 10**5000}, "ead_min_stint",
         "ead_min_stint must be an integer in [0, 1024], got <int too large to show>"),
        ({"ead_mode": "lossy"}, "ead_mode", "ead_mode must be one of ['faithful', 'speculative'], got 'lossy'"),
        ({"ead_mode": 1}, "ead_mode", "ead_mode must be one of ['faithful', 'speculative'], got 1"),
    ],
)
def test_bad_values_name_key_range_and_value(extra_args: dict, parameter: str, message: str) -> None:
    with pytest.raises(SamplerParamError) as e:
        parse_request(extra_args, SERVING)
    assert str(e.value) == message
    assert e.value.parameter == parameter
    assert e.value.value is extra_args[parameter]


def test_ead_false_with_a_knob_is_a_contradiction_named_on_ead() -> None:
    with pytest.raises(SamplerParamError) as e:
        parse_request({"ead": False, "ead_tau": 2.0, "ead_mode": "faithful"}, SERVING)
    assert str(e.value) == (
        "ead is false but the request also sets ['ead_tau', 'ead_mode']: send ead: true (or leave "
        "it out) to use EAD with them, or drop them"
    )
    assert e.value.parameter == "ead" and e.value.value is False


def test_the_window_limit_is_the_deployments_max_window() -> None:
    wide = RoutingConfig(enabled=True, max_window=256)
    assert parse_request({"ead_window": 256}, wide) == RequestRouting(tau=1.5, window=256, min_stint=0, mode="speculative")
    with pytest.raises(SamplerParamError, match=r"ead_window must be an integer in \[1, 32\], got 33"):
        parse_request({"ead_window": 33}, RoutingConfig(enabled=True))


def test_parse_request_does_not_look_at_enabled() -> None:
    # Whether the deployment serves EAD is admission's question (it names the key).
    assert parse_request({"ead": True}, RoutingConfig()) == RequestRouting(
        tau=1.5, window=5, min_stint=0, mode="speculative"
    )
