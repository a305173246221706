"""The deployment config: typed, validated once, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_adaptive.config import ADDITIONAL_CONFIG_KEY, AdaptiveConfig, ConfigError


def test_defaults_match_llama_cpp_mirostat_defaults() -> None:
    config = AdaptiveConfig()
    assert config.sampling.enabled is True
    assert config.sampling.mirostat_tau == 5.0
    assert config.sampling.mirostat_eta == 0.1
    assert config.metrics.enabled is True


def test_round_trips_through_dict() -> None:
    config = AdaptiveConfig.from_dict({"sampling": {"mirostat_tau": 3, "enabled": False}})
    assert config.sampling.mirostat_tau == 3.0
    assert isinstance(config.sampling.mirostat_tau, float)
    assert AdaptiveConfig.from_dict(config.to_dict()) == config


def test_unknown_key_is_named_with_the_allowed_keys() -> None:
    with pytest.raises(ConfigError) as e:
        AdaptiveConfig.from_dict({"sampling": {"mirostat_tua": 3.0}}, source="a.yaml")
    message = str(e.value)
    assert "a.yaml" in message and "'sampling.mirostat_tua'" in message
    assert "mirostat_tau" in message


def test_unknown_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'samplers'.*\['metrics', 'sampling'\]"):
        AdaptiveConfig.from_dict({"samplers": {}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"sampling": {"mirostat_tau": -1}}, r"sampling\.mirostat_tau must be in \(0\.0, 40\.0\], got -1\.0"),
        ({"sampling": {"mirostat_eta": 0}}, r"sampling\.mirostat_eta must be in \(0\.0, 1\.0\], got 0\.0"),
        ({"sampling": {"mirostat_tau": "high"}}, r"sampling\.mirostat_tau must be a float, got 'high'"),
        ({"sampling": {"enabled": "yes"}}, r"sampling\.enabled must be a bool, got 'yes'"),
        ({"sampling": {"mirostat_tau": float("nan")}}, r"sampling\.mirostat_tau must be in"),
        ({"sampling": 3}, r"sampling must be a mapping, got 3"),
    ],
)
def test_bad_values_name_key_range_and_value(data: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        AdaptiveConfig.from_dict(data)


def test_from_file_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.yaml"
    path.write_text("sampling:\n  mirostat_tau: 2.5\nmetrics:\n  enabled: false\n")
    config = AdaptiveConfig.from_file(path)
    assert config.sampling.mirostat_tau == 2.5
    assert config.metrics.enabled is False


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert AdaptiveConfig.from_file(path) == AdaptiveConfig()


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        AdaptiveConfig.from_file(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        AdaptiveConfig.from_file(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        AdaptiveConfig.from_file(listed)


def test_from_vllm_config_reads_additional_config() -> None:
    class FakeVllmConfig:
        additional_config = {ADDITIONAL_CONFIG_KEY: {"sampling": {"mirostat_eta": 0.3}}}

    class OffVllmConfig:
        additional_config: dict = {}

    config = AdaptiveConfig.from_vllm_config(FakeVllmConfig())
    assert config is not None and config.sampling.mirostat_eta == 0.3
    assert AdaptiveConfig.from_vllm_config(OffVllmConfig()) is None
