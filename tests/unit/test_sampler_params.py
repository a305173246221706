"""Per-request sampler arguments: what is accepted, and errors that name parameter, range, value."""

from __future__ import annotations

import pytest

from vllm_adaptive.config import SamplingConfig
from vllm_adaptive.sampling.params import SamplerParamError, parse_sampler_request


def test_no_sampler_requested() -> None:
    assert parse_sampler_request(None) is None
    assert parse_sampler_request({}) is None
    assert parse_sampler_request({"other_processor_key": 1}) is None


def test_request_values_and_defaults() -> None:
    request = parse_sampler_request({"adaptive_sampler": "mirostat_v2", "mirostat_tau": 3})
    assert request is not None and request.name == "mirostat_v2"
    assert dict(request.values) == {"mirostat_tau": 3.0}
    filled = parse_sampler_request({"adaptive_sampler": "mirostat_v2"}, SamplingConfig(mirostat_tau=4.0))
    assert filled is not None
    assert dict(filled.values) == {"mirostat_tau": 4.0, "mirostat_eta": 0.1}


@pytest.mark.parametrize(("sent", "value"), [("0.25", 0.25), ("1e-1", 0.1), ("+.5", 0.5), ("1", 1.0)])
def test_plain_decimal_strings_are_numbers(sent: str, value: float) -> None:
    # vllm_xargs values may be strings; a plain decimal number spelled as one is accepted
    request = parse_sampler_request({"adaptive_sampler": "mirostat_v2", "mirostat_eta": sent})
    assert request is not None and request.values["mirostat_eta"] == value


@pytest.mark.parametrize(
    "sent",
    [
        True, False, None, [0.5], [], {"value": 0.5}, float("nan"), float("inf"), -float("inf"),
        "true", "nan", "NaN", "inf", "-Infinity", "1e400", "", " 0.5", "0.5 ", "1_0",
        "0x1", "\u0661", "0.5.1", "five", "1e", (0.5,),
    ],
    ids=repr,
)
def test_what_is_not_a_number_is_refused_with_key_range_and_value(sent: object) -> None:
    for sampler, key, interval in [
        ("top_n_sigma", "top_n_sigma", "(0, 100]"),
        ("dynatemp", "dynatemp_range", "[0, 10]"),
        ("mirostat_v1", "mirostat_m", "[2, 1000]"),
    ]:
        with pytest.raises(SamplerParamError) as e:
            parse_sampler_request({"adaptive_sampler": sampler, key: sent})
        assert e.value.parameter == key and e.value.value is sent
        assert str(e.value) == f"{key} must be a number in {interval}, got {sent!r}"


def test_huge_values_are_refused_and_shown_shortened() -> None:
    cases = [
        (10**400, "1" + "0" * 99 + "... (401 characters)"),
        (10**5000, "<int too large to show>"),
        ("9" * 10000, "'" + "9" * 99 + "... (10002 characters)"),
    ]
    for sent, shown in cases:
        with pytest.raises(SamplerParamError) as e:
            parse_sampler_request({"adaptive_sampler": "typical", "typical_p": sent})
        assert str(e.value) == f"typical_p must be a number in (0, 1], got {shown}"
    with pytest.raises(SamplerParamError) as e:
        parse_sampler_request({"adaptive_sampler": "x" * 500})
    assert str(e.value).endswith("got '" + "x" * 99 + "... (502 characters)")


@pytest.mark.parametrize("sent", [True, None, ["typical"], {"name": "typical"}, "Typical", " typical"], ids=repr)
def test_sampler_name_must_be_a_registered_string(sent: object) -> None:
    with pytest.raises(SamplerParamError) as e:
        parse_sampler_request({"adaptive_sampler": sent, "typical_p": 0.5})
    assert e.value.parameter == "adaptive_sampler"
    assert str(e.value).startswith("adaptive_sampler must be one of ['dynatemp', 'edt',")
    assert str(e.value).endswith(f"got {sent!r}")


def test_worker_defaults_come_from_the_deployment_config() -> None:
    request = parse_sampler_request({"adaptive_sampler": "edt", "edt_theta": 2}, SamplingConfig(edt_base=0.5))
    assert request is not None and dict(request.values) == {"edt_base": 0.5, "edt_theta": 2.0}


@pytest.mark.parametrize(
    ("extra_args", "parameter", "message"),
    [
        ({"adaptive_sampler": "nope"}, "adaptive_sampler",
         "adaptive_sampler must be one of ['dynatemp', 'edt', 'epsilon', 'eta', 'mirostat_v1', 'mirostat_v2', 'top_n_sigma', 'typical'], got 'nope'"),
        ({"adaptive_sampler": 3}, "adaptive_sampler", "adaptive_sampler must be one of ['dynatemp', 'edt', 'epsilon', 'eta', 'mirostat_v1', 'mirostat_v2', 'top_n_sigma', 'typical'], got 3"),
        ({"adaptive_sampler": "mirostat_v2", "mirostat_tau": -1}, "mirostat_tau",
         "mirostat_tau must be a number in (0, 40], got -1"),
        ({"adaptive_sampler": "mirostat_v2", "mirostat_tau": 0}, "mirostat_tau",
         "mirostat_tau must be a number in (0, 40], got 0"),
        ({"adaptive_sampler": "mirostat_v2", "mirostat_eta": 1.5}, "mirostat_eta",
         "mirostat_eta must be a number in (0, 1], got 1.5"),
        ({"adaptive_sampler": "mirostat_v2", "mirostat_tau": "abc"}, "mirostat_tau",
         "mirostat_tau must be a number in (0, 40], got 'abc'"),
        ({"adaptive_sampler": "mirostat_v2", "mirostat_tau": "nan"}, "mirostat_tau",
         "mirostat_tau must be a number in (0, 40], got 'nan'"),
        ({"adaptive_sampler": "mirostat_v2", "mirostat_tau": [1]}, "mirostat_tau",
         "mirostat_tau must be a number in (0, 40], got [1]"),
        ({"mirostat_tau": 3.0}, "mirostat_tau", "mirostat_tau needs adaptive_sampler"),
        ({"adaptive_sampler": "mirostat_v1", "mirostat_m": 1}, "mirostat_m",
         "mirostat_m must be a number in [2, 1000], got 1"),
        ({"adaptive_sampler": "dynatemp", "dynatemp_range": 11}, "dynatemp_range",
         "dynatemp_range must be a number in [0, 10], got 11"),
        ({"adaptive_sampler": "dynatemp", "dynatemp_exponent": 0}, "dynatemp_exponent",
         "dynatemp_exponent must be a number in (0, 10], got 0"),
        ({"adaptive_sampler": "edt", "edt_base": 1}, "edt_base", "edt_base must be a number in (0, 1), got 1"),
        ({"adaptive_sampler": "typical", "typical_p": 0}, "typical_p",
         "typical_p must be a number in (0, 1], got 0"),
        ({"adaptive_sampler": "epsilon", "epsilon": 1}, "epsilon", "epsilon must be a number in (0, 1), got 1"),
        ({"adaptive_sampler": "eta", "eta_cutoff": -0.1}, "eta_cutoff",
         "eta_cutoff must be a number in (0, 1), got -0.1"),
        ({"adaptive_sampler": "top_n_sigma", "top_n_sigma": 0}, "top_n_sigma",
         "top_n_sigma must be a number in (0, 100], got 0"),
        ({"adaptive_sampler": "eta", "epsilon": 0.1}, "epsilon",
         "epsilon does not apply to adaptive_sampler='eta'; its parameters are ['eta_cutoff']"),
    ],
)
def test_errors_name_parameter_allowed_values_and_value(extra_args: dict, parameter: str, message: str) -> None:
    with pytest.raises(SamplerParamError) as e:
        parse_sampler_request(extra_args)
    assert e.value.parameter == parameter
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mirostat_v1", {"mirostat_tau": 5.0, "mirostat_eta": 0.1, "mirostat_m": 100.0}),
        ("mirostat_v2", {"mirostat_tau": 5.0, "mirostat_eta": 0.1}),
        ("dynatemp", {"dynatemp_range": 0.5, "dynatemp_exponent": 1.0}),
        ("edt", {"edt_base": 0.8, "edt_theta": 1.0}),
        ("typical", {"typical_p": 0.95}),
        ("epsilon", {"epsilon": 3e-4}),
        ("eta", {"eta_cutoff": 3e-4}),
        ("top_n_sigma", {"top_n_sigma": 1.0}),
    ],
)
def test_every_sampler_fills_its_defaults(name: str, expected: dict) -> None:
    request = parse_sampler_request({"adaptive_sampler": name}, SamplingConfig())
    assert request is not None and request.name == name
    assert dict(request.values) == expected
