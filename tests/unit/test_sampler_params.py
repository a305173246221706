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


def test_numbers_sent_as_strings_are_accepted() -> None:
    # vllm_xargs values may be strings; "3.0" is a number
    request = parse_sampler_request({"adaptive_sampler": "mirostat_v2", "mirostat_eta": "0.25"})
    assert request is not None and request.values["mirostat_eta"] == 0.25


@pytest.mark.parametrize(
    ("extra_args", "parameter", "message"),
    [
        ({"adaptive_sampler": "nope"}, "adaptive_sampler",
         "adaptive_sampler must be one of ['mirostat_v2'], got 'nope'"),
        ({"adaptive_sampler": 3}, "adaptive_sampler", "adaptive_sampler must be one of ['mirostat_v2'], got 3"),
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
    ],
)
def test_errors_name_parameter_allowed_values_and_value(extra_args: dict, parameter: str, message: str) -> None:
    with pytest.raises(SamplerParamError) as e:
        parse_sampler_request(extra_args)
    assert e.value.parameter == parameter
    assert message in str(e.value)
