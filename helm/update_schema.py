"""Rewrite the `adaptive` section of helm/vllm-adaptive/values.schema.json from the plugin's config.

The chart's `adaptive:` values block is the plugin's `--adaptive-config`; its schema lists the
same sections and keys, with the same JSON types, as the config dataclasses
(vllm_adaptive/config.py, vllm_adaptive/speculative/config.py), so `helm template` refuses the
keys and types the plugin would refuse at start-up. After changing a config field, run

    .venv/bin/python helm/update_schema.py

tests/chart/test_chart_adaptive_schema.py fails until the schema matches. Value ranges stay the
plugin's own check (at start-up, and in the tests on every rendered ConfigMap).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

SCHEMA = Path(__file__).resolve().parent / "vllm-adaptive" / "values.schema.json"
DESCRIPTION = (
    "The plugin's --adaptive-config (README, Configuration): sections, keys and types mirror "
    "vllm_adaptive/config.py (helm/update_schema.py); ranges are checked by the plugin at start-up."
)


def _choices() -> dict[tuple[str, str], list[str]]:
    from vllm_adaptive.kvcache import config as kvcache
    from vllm_adaptive.routing import config as routing
    from vllm_adaptive.speculative import config as speculative

    return {
        ("kvcache", "policy"): list(kvcache.KV_POLICIES),
        ("routing", "mode"): list(routing.ROUTING_MODES),
        ("speculative", "stop_rule"): list(speculative.STOP_RULES),
        ("speculative", "confidence"): list(speculative.CONFIDENCES),
        ("speculative", "specdec_threshold"): [speculative.AUTO],
    }


def field_schema(section: str, name: str, annotation: Any, choices: dict[tuple[str, str], list[str]]) -> dict[str, Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return {"anyOf": [field_schema(section, name, a, choices) for a in typing.get_args(annotation)]}
    if annotation is str:
        schema: dict[str, Any] = {"type": "string"}
        if (section, name) in choices:
            schema["enum"] = choices[(section, name)]
        return schema
    kinds = {bool: "boolean", int: "integer", float: "number", type(None): "null"}
    if annotation not in kinds:
        raise TypeError(f"{section}.{name}: no JSON type for {annotation!r}")
    return {"type": kinds[annotation]}


def adaptive_schema() -> dict[str, Any]:
    from vllm_adaptive.config import AdaptiveConfig

    choices = _choices()
    sections = typing.get_type_hints(AdaptiveConfig)
    properties = {}
    for section in dataclasses.fields(AdaptiveConfig):
        cls = sections[section.name]
        hints = typing.get_type_hints(cls)
        properties[section.name] = {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {f.name: field_schema(section.name, f.name, hints[f.name], choices)
                           for f in dataclasses.fields(cls)},
        }
    return {"type": "object", "additionalProperties": False, "description": DESCRIPTION, "properties": properties}


def main() -> int:
    schema = json.loads(SCHEMA.read_text())
    schema["properties"]["adaptive"] = adaptive_schema()
    SCHEMA.write_text(json.dumps(schema, indent=2) + "\n")
    print(f"update_schema: wrote the adaptive section of {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
