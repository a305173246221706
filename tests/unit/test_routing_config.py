"""The `routing:` section (Entropy Adaptive Decoding): defaults, ranges, and the refusal to run
it together with adaptive draft length. Errors name the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_adaptive.config import AdaptiveConfig, ConfigError
from vllm_adaptive.routing.config import RoutingConfig


def test_defaults() -> None:
    assert AdaptiveConfig().to_dict()["routing"] == {
        "enabled": False,
        "default_on": False,
        "tau": 1.5,
        "window": 5,
        "min_stint": 0,
        "mode": "speculative",
        "max_window": 32,
        "large_draft_tokens": None,
        "min_drafting_fraction": 0.0,
    }


def test_reads_from_yaml_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "adaptive.yaml"
    path.write_text(
        "routing:\n  enabled: true\n  default_on: true\n  tau: 2\n  window: 64\n"
        "  min_stint: 1024\n  mode: faithful\n  max_window: 256\n  large_draft_tokens: 2\n"
        "  min_drafting_fraction: 0.5\n"
    )
    config = AdaptiveConfig.from_file(path)
    assert config.routing == RoutingConfig(
        enabled=True, default_on=True, tau=2.0, window=64, min_stint=1024, mode="faithful", max_window=256,
        large_draft_tokens=2, min_drafting_fraction=0.5,
    )
    assert isinstance(config.routing.tau, float)
    assert AdaptiveConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"tau": 0}, "a.yaml: routing.tau must be a number in (0, inf) bits, got 0.0"),
        ({"tau": -1}, "a.yaml: routing.tau must be a number in (0, inf) bits, got -1.0"),
        ({"tau": float("inf")}, "a.yaml: routing.tau must be a number in (0, inf) bits, got inf"),
        ({"tau": float("nan")}, "a.yaml: routing.tau must be a number in (0, inf) bits, got nan"),
        ({"tau": "low"}, "a.yaml: routing.tau must be a float, got 'low'"),
        ({"tau": True}, "a.yaml: routing.tau must be a float, got True"),
        ({"window": 0}, "a.yaml: routing.window must be an integer in [1, max_window=32], got 0"),
        ({"window": 33}, "a.yaml: routing.window must be an integer in [1, max_window=32], got 33"),
        ({"window": 8, "max_window": 4}, "a.yaml: routing.window must be an integer in [1, max_window=4], got 8"),
        ({"window": 2.5}, "a.yaml: routing.window must be a int, got 2.5"),
        ({"min_stint": -1}, "a.yaml: routing.min_stint must be an integer in [0, 1024], got -1"),
        ({"min_stint": 1025}, "a.yaml: routing.min_stint must be an integer in [0, 1024], got 1025"),
        ({"max_window": 0}, "a.yaml: routing.max_window must be an integer in [1, 256], got 0"),
        ({"max_window": 257}, "a.yaml: routing.max_window must be an integer in [1, 256], got 257"),
        ({"mode": "lossy"}, "a.yaml: routing.mode must be one of ['faithful', 'speculative'], got 'lossy'"),
        ({"large_draft_tokens": 0},
         "a.yaml: routing.large_draft_tokens must be an integer in [1, 128] or null, got 0"),
        ({"large_draft_tokens": 129},
         "a.yaml: routing.large_draft_tokens must be an integer in [1, 128] or null, got 129"),
        ({"min_drafting_fraction": -0.1},
         "a.yaml: routing.min_drafting_fraction must be a number in [0, 1], got -0.1"),
        ({"min_drafting_fraction": 1.5},
         "a.yaml: routing.min_drafting_fraction must be a number in [0, 1], got 1.5"),
        ({"min_drafting_fraction": float("nan")},
         "a.yaml: routing.min_drafting_fraction must be a number in [0, 1], got nan"),
        ({"enabled": "yes"}, "a.yaml: routing.enabled must be a bool, got 'yes'"),
        ({"default_on": True},
         "a.yaml: routing.default_on needs enabled: true (requests cannot use EAD by default on a "
         "deployment that does not serve it); set routing.enabled: true or drop default_on"),
    ],
)
def test_bad_values_name_the_key_and_the_value(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        AdaptiveConfig.from_dict({"routing": section}, source="a.yaml")
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tau": True}, "tau must be a number in (0, inf) bits, got True"),
        ({"tau": "1.5"}, "tau must be a number in (0, inf) bits, got '1.5'"),
        ({"window": True}, "window must be an integer in [1, max_window=32], got True"),
        ({"enabled": 1}, "enabled must be true or false, got 1"),
        ({"mode": None}, "mode must be one of ['faithful', 'speculative'], got None"),
    ],
)
def test_built_directly_the_types_are_checked_too(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        RoutingConfig(**kwargs)
    assert str(e.value) == message


def test_unknown_routing_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'routing.tua'; allowed keys under routing: \["):
        AdaptiveConfig.from_dict({"routing": {"tua": 1.0}})


def test_routing_and_adaptive_draft_length_are_not_combined() -> None:
    with pytest.raises(ConfigError) as e:
        AdaptiveConfig.from_dict(
            {"routing": {"enabled": True}, "speculative": {"enabled": True}}, source="a.yaml"
        )
    assert str(e.value) == (
        "a.yaml: routing.enabled and speculative.enabled cannot both be true: EAD (routing) runs "
        "on vLLM's fixed draft length in this version, and adaptive draft length (speculative) "
        "changes it per request; set one of them to false"
    )


def test_either_one_alone_is_accepted() -> None:
    assert AdaptiveConfig.from_dict({"routing": {"enabled": True}}).routing.enabled is True
    assert AdaptiveConfig.from_dict({"speculative": {"enabled": True}, "routing": {"tau": 3}}).speculative.enabled


def test_the_section_imports_neither_torch_nor_vllm() -> None:
    import subprocess
    import sys

    script = (
        "import sys; import vllm_adaptive.routing.config, vllm_adaptive.routing.params; "
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
