"""The values schema's `adaptive:` section mirrors the plugin's config dataclasses, key for key
and type for type, so `helm template` refuses exactly the keys and types `--adaptive-config`
refuses (vllm_adaptive/config.py, vllm_adaptive/speculative/config.py); every values.yaml key is
documented in docs/kubernetes.md. The expected JSON types are derived here from the dataclasses'
annotations, apart from helm/update_schema.py, which rewrites the schema after a config change.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from chart_tools import CHART, REPO, config_map_file, render

from vllm_adaptive.config import AdaptiveConfig
from vllm_adaptive.speculative import config as speculative_config

SCHEMA = json.loads((CHART / "values.schema.json").read_text())
FIX = "; run .venv/bin/python helm/update_schema.py"
ADAPTIVE = SCHEMA["properties"]["adaptive"]
# Fields whose str values are limited to a set, and that set.
CHOICES = {
    ("speculative", "stop_rule"): set(speculative_config.STOP_RULES),
    ("speculative", "confidence"): set(speculative_config.CONFIDENCES),
    ("speculative", "specdec_threshold"): {speculative_config.AUTO},
    ("routing", "mode"): {"faithful", "speculative"},
    ("kvcache", "policy"): {"streaming", "snapkv", "h2o", "keynorm"},
}


def accepted_json_types(schema: dict[str, Any]) -> set[str]:
    if "anyOf" in schema:
        return set().union(*(accepted_json_types(s) for s in schema["anyOf"]))
    kinds = schema["type"]
    return set(kinds) if isinstance(kinds, list) else {kinds}


def json_types_of(annotation: Any) -> set[str]:
    """JSON types a config field accepts (config._coerce: int is not float's, bool is not int's)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(json_types_of(a) for a in typing.get_args(annotation)))
    return {bool: {"boolean"}, int: {"integer"}, float: {"number"}, str: {"string"},
            type(None): {"null"}}[annotation]


def test_adaptive_sections_are_the_config_sections() -> None:
    hints = typing.get_type_hints(AdaptiveConfig)
    assert ADAPTIVE["additionalProperties"] is False
    assert set(ADAPTIVE["properties"]) == {f.name for f in dataclasses.fields(AdaptiveConfig)}, FIX
    for section in ADAPTIVE["properties"]:
        assert dataclasses.is_dataclass(hints[section])


def test_every_config_field_has_its_type_in_the_schema() -> None:
    hints = typing.get_type_hints(AdaptiveConfig)
    for section, section_schema in ADAPTIVE["properties"].items():
        cls = hints[section]
        field_hints = typing.get_type_hints(cls)
        assert section_schema["additionalProperties"] is False, section
        assert set(section_schema["properties"]) == {f.name for f in dataclasses.fields(cls)}, section + FIX
        for name, field_schema in section_schema["properties"].items():
            expected = json_types_of(field_hints[name])
            # A JSON "number" accepts integers, which the config's float fields accept too.
            assert accepted_json_types(field_schema) == expected, f"{section}.{name}: {field_schema} vs {expected}{FIX}"


def test_string_choices_are_the_configs() -> None:
    for section, section_schema in ADAPTIVE["properties"].items():
        for name, field_schema in section_schema["properties"].items():
            options = [s for s in field_schema.get("anyOf", [field_schema]) if s.get("type") == "string"]
            if (section, name) in CHOICES:
                assert len(options) == 1 and set(options[0]["enum"]) == CHOICES[(section, name)], f"{section}.{name}{FIX}"
            else:
                assert all("enum" not in s for s in options), (section, name)


def test_the_plugins_full_default_config_renders_and_round_trips(tmp_path: Path) -> None:
    """Every key with its default value (nulls and "auto" included) passes the schema, and the
    plugin reads back the same config from the rendered ConfigMap."""
    defaults = AdaptiveConfig().to_dict()
    objects = render(values={"adaptive": defaults}, tmp_dir=tmp_path)
    path = tmp_path / "adaptive.yaml"
    path.write_text(config_map_file(objects, "/etc/vllm-adaptive/adaptive.yaml"))
    assert yaml.safe_load(path.read_text()) == defaults
    assert AdaptiveConfig.from_file(path) == AdaptiveConfig()


def leaf_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and key not in ("adaptive", "resources", "podSecurityContext",
                                                             "securityContext", "labels"):
            keys += leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def test_every_values_key_is_documented() -> None:
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    keys = leaf_keys(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert len(keys) > 50
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/kubernetes.md does not document {missing}"


def test_every_values_key_is_in_the_schema() -> None:
    def walk(values: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            assert key in schema.get("properties", {}), f"{prefix}{key} is not in values.schema.json"
            sub = schema["properties"][key]
            if isinstance(value, dict) and "properties" in sub:
                walk(value, sub, f"{prefix}{key}.")

    walk(yaml.safe_load((CHART / "values.yaml").read_text()), SCHEMA, "")
