"""The deployment config: typed, validated once, errors that name the key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
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
    with pytest.raises(ConfigError, match=r"unknown key 'samplers'.*\['kvcache', 'metrics', 'routing', 'sampling', 'speculative'\]"):
        AdaptiveConfig.from_dict({"samplers": {}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"sampling": {"mirostat_tau": -1}}, r"sampling\.mirostat_tau must be a number in \(0, 40\], got -1\.0"),
        ({"sampling": {"mirostat_eta": 0}}, r"sampling\.mirostat_eta must be a number in \(0, 1\], got 0\.0"),
        ({"sampling": {"mirostat_tau": "high"}}, r"sampling\.mirostat_tau must be a float, got 'high'"),
        ({"sampling": {"enabled": "yes"}}, r"sampling\.enabled must be a bool, got 'yes'"),
        ({"sampling": {"mirostat_tau": float("nan")}}, r"sampling\.mirostat_tau must be a number in"),
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


def test_sampling_section_keys_and_defaults() -> None:
    # The YAML keys under `sampling:` and their defaults, as documented (docs/samplers.md): the
    # llama.cpp defaults for Mirostat and dynatemp's exponent, the project's for the rest.
    assert AdaptiveConfig().to_dict()["sampling"] == {
        "enabled": True,
        "mirostat_tau": 5.0,
        "mirostat_eta": 0.1,
        "mirostat_m": 100.0,
        "dynatemp_range": 0.5,
        "dynatemp_exponent": 1.0,
        "edt_base": 0.8,
        "edt_theta": 1.0,
        "typical_p": 0.95,
        "epsilon": 3e-4,
        "eta_cutoff": 3e-4,
        "top_n_sigma": 1.0,
    }


def test_sampling_config_is_the_registry_parameters() -> None:
    from vllm_adaptive.config import SamplingConfig
    from vllm_adaptive.sampling.registry import SAMPLERS

    fields = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    declared = {p.key: p.default for d in SAMPLERS.values() for p in d.params}
    assert fields == {"enabled": True, **declared}


def test_config_and_request_parser_do_not_import_each_other() -> None:
    # Each module imported alone, in a fresh interpreter: config must not pull in the request
    # parser (sampling.params), and the parser's modules must not pull in config.
    script = (
        "import sys, importlib; importlib.import_module(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m in sys.argv[2:]))"
    )
    config = subprocess.run(
        [sys.executable, "-c", script, "vllm_adaptive.config", "vllm_adaptive.sampling.params"],
        capture_output=True, text=True, check=True,
    )
    assert config.stdout.strip() == "[]"
    params = subprocess.run(
        [sys.executable, "-c", script, "vllm_adaptive.sampling.params", "vllm_adaptive.config"],
        capture_output=True, text=True, check=True,
    )
    assert params.stdout.strip() == "[]"


def test_sampling_values_must_be_numbers_not_booleans() -> None:
    from vllm_adaptive.config import SamplingConfig

    with pytest.raises(ConfigError, match=r"top_n_sigma must be a number in \(0, 100\], got True"):
        SamplingConfig(top_n_sigma=True)
    with pytest.raises(ConfigError, match=r"sampling\.dynatemp_range must be a float, got True"):
        AdaptiveConfig.from_dict({"sampling": {"dynatemp_range": True}})


@pytest.mark.parametrize(
    ("key", "value", "interval"),
    [
        ("mirostat_m", 1, "[2, 1000]"),
        ("dynatemp_range", -0.1, "[0, 10]"),
        ("dynatemp_exponent", 0, "(0, 10]"),
        ("edt_base", 1.0, "(0, 1)"),
        ("edt_theta", 11, "(0, 10]"),
        ("typical_p", 1.5, "(0, 1]"),
        ("epsilon", 0, "(0, 1)"),
        ("eta_cutoff", 1, "(0, 1)"),
        ("top_n_sigma", 0, "(0, 100]"),
    ],
)
def test_every_sampler_default_is_range_checked(key: str, value: float, interval: str) -> None:
    with pytest.raises(ConfigError) as e:
        AdaptiveConfig.from_dict({"sampling": {key: value}})
    assert f"sampling.{key} must be a number in {interval}, got {float(value)!r}" in str(e.value)


@pytest.mark.parametrize(
    ("section", "pattern"),
    [
        ({"specdec_threshold": "often"}, r"speculative\.specdec_threshold must be 'auto' or a number in \(0, 1\), got 'often'"),
        ({"specdec_threshold": 0.0}, r"speculative\.specdec_threshold must be 'auto' or a number in \(0, 1\), got 0\.0"),
        ({"draft_cost_ratio": 1.5}, r"speculative\.draft_cost_ratio must be null \(measured\) or a number in \(0, 1\), got 1\.5"),
        ({"draft_cost_ratio": "low"}, r"speculative\.draft_cost_ratio must be a float or null, got 'low'"),
    ],
)
def test_speculative_threshold_and_cost_ratio_are_validated(section: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        AdaptiveConfig.from_dict({"speculative": section})


def test_speculative_auto_threshold_and_measured_ratio_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_text("speculative:\n  specdec_threshold: auto\n  draft_cost_ratio: null\n")
    config = AdaptiveConfig.from_file(path)
    assert config.speculative.specdec_threshold == "auto" and config.speculative.draft_cost_ratio is None
    path.write_text("speculative:\n  specdec_threshold: 0.8\n  draft_cost_ratio: 0.05\n")
    config = AdaptiveConfig.from_file(path)
    assert config.speculative.specdec_threshold == 0.8 and config.speculative.draft_cost_ratio == 0.05
    assert AdaptiveConfig.from_dict(config.to_dict()) == config


def test_controller_initial_k_defaults_below_a_small_max_draft_tokens() -> None:
    from vllm_adaptive.speculative.config import initial_k

    assert initial_k(AdaptiveConfig.from_dict({"speculative": {"max_draft_tokens": 2}}).speculative) == 2
    assert initial_k(AdaptiveConfig.from_dict({"speculative": {"max_draft_tokens": 8}}).speculative) == 4
    config = AdaptiveConfig.from_dict({"speculative": {"max_draft_tokens": 8, "controller_initial_k": 0}})
    assert initial_k(config.speculative) == 0


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    """The configs the README and `make serve` point at are valid plugin configs."""
    config = AdaptiveConfig.from_file(path)
    assert config.to_dict() != AdaptiveConfig().to_dict()  # each one switches something on
