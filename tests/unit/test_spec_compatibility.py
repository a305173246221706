"""Adaptive drafting refuses, at start-up, every vLLM setting it cannot run with (issue #5).

`vllm_adaptive.engine_kwargs` (offline, and `--plugin adaptive` on the CLI) checks the
deployment's arguments before any engine starts; each error names the setting to change.
"""

from __future__ import annotations

from typing import Any

import pytest

import vllm_adaptive
from vllm_adaptive.config import ConfigError
from vllm_adaptive.speculative.compatibility import problems
from vllm_adaptive.speculative.config import AdaptiveDraftConfig

K_MAX = 4
ENABLED = {"speculative": {"enabled": True, "max_draft_tokens": K_MAX}}


@pytest.mark.parametrize(
    ("config", "engine_args", "pattern"),
    [
        ({}, {}, r"needs vLLM's draft-model speculation: pass --speculative-config"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": K_MAX}}, {},
         r"method must be 'draft_model' \(got 'ngram'\)"),
        ({"speculative_config": {"method": "draft_model", "model": "m", "num_speculative_tokens": 2}}, {},
         r"num_speculative_tokens \(2\) must equal speculative.max_draft_tokens \(4\)"),
        ({"speculative_config": {"method": "draft_model", "model": "m", "parallel_drafting": True}}, {},
         r"parallel_drafting must be off"),
        ({"speculative_config": {"method": "draft_model", "model": "m"}}, {"async_scheduling": True},
         r"async scheduling must be off"),
        ({"speculative_config": {"method": "draft_model", "model": "m"}}, {"tensor_parallel_size": 2},
         r"tensor_parallel_size must be 1 \(got 2\)"),
    ],
)
def test_unsupported_settings_are_refused_before_the_engine_starts(
    config: dict[str, Any], engine_args: dict[str, Any], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        vllm_adaptive.engine_kwargs(ENABLED, **config, **engine_args)


def test_model_runner_v2_is_refused_with_the_setting_to_change(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ConfigError, match=r"set VLLM_USE_V2_MODEL_RUNNER=0 \(it is set to 1\)"):
        vllm_adaptive.engine_kwargs(ENABLED, speculative_config={"method": "draft_model", "model": "m"})


def test_supported_settings_fill_k_and_turn_async_scheduling_off() -> None:
    kwargs = vllm_adaptive.engine_kwargs(ENABLED, speculative_config={"method": "draft_model", "model": "m"})
    assert kwargs["speculative_config"] == {"method": "draft_model", "model": "m", "num_speculative_tokens": K_MAX}
    assert kwargs["async_scheduling"] is False
    assert kwargs["additional_config"]["adaptive"]["speculative"]["enabled"] is True


def test_adaptive_drafting_off_leaves_speculative_arguments_alone() -> None:
    ngram = {"method": "ngram", "num_speculative_tokens": 2}
    kwargs = vllm_adaptive.engine_kwargs({}, speculative_config=ngram, async_scheduling=True)
    assert kwargs["speculative_config"] == ngram and kwargs["async_scheduling"] is True


def test_every_problem_is_reported_at_once() -> None:
    found = problems(AdaptiveDraftConfig(enabled=True, max_draft_tokens=K_MAX), {
        "method": "eagle", "num_speculative_tokens": K_MAX, "use_local_argmax_reduction": True,
        "rejection_sample_method": "block", "async_scheduling": True, "data_parallel_size": 2,
        "model_runner_v2": None,
    })
    assert [f.split(" ")[:2] for f in found] == [
        ["speculative_config", "method"],
        ["speculative_config", "use_local_argmax_reduction"],
        ["speculative_config", "rejection_sample_method"],
        ["async", "scheduling"],
        ["data_parallel_size", "must"],
        ["adaptive", "drafting"],
    ]
    assert "Model Runner V2 is the default on this platform" in found[-1]


def test_config_file_errors_name_the_speculative_key() -> None:
    with pytest.raises(ConfigError, match=r"a\.yaml: speculative\.entropy_threshold must be a number in \(0, inf\), got -1\.0"):
        vllm_adaptive.config.AdaptiveConfig.from_dict({"speculative": {"entropy_threshold": -1}}, source="a.yaml")
