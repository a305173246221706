"""Rendering the Helm chart (helm/vllm-adaptive) with the real `helm`, and reading what it renders.

`helm` is the official binary that `make setup` extracts into the venv's bin
(helm/install_tools.py); a test that needs it and does not find it fails. Rendered objects are
plain dicts (yaml.safe_load of `helm template`'s output).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "vllm-adaptive"
# The example values files users start from, and chart-testing's (ct install on kind).
EXAMPLES = sorted((CHART / "examples").glob("*.yaml")) + sorted((CHART / "ci").glob("*-values.yaml"))
# None: the chart's defaults (values.yaml) alone.
VALUES_FILES: list[Path | None] = [None, *EXAMPLES]
RELEASE = "llm"
NAMESPACE = "inference"
# Object kinds that come from CRDs (prometheus-operator, KEDA), not from Kubernetes itself.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def values_id(path: Path | None) -> str:
    return "defaults" if path is None else f"{path.parent.name}/{path.name}"


def helm_binary() -> Path:
    helm = Path(sys.executable).parent / "helm"
    if not helm.exists():
        pytest.fail(f"helm not found at {helm}: `make setup` installs it (helm/install_tools.py)")
    return helm


def helm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm_binary()), *args], capture_output=True, text=True, timeout=timeout)


def _value_args(values_file: Path | None, values: dict[str, Any] | None, tmp_dir: Path | None) -> list[str]:
    args = []
    if values_file is not None:
        args += ["--values", str(values_file)]
    if values is not None:
        if tmp_dir is None:
            raise ValueError("values given as a dict need a tmp_dir to write them to")
        extra = tmp_dir / f"values-{len(list(tmp_dir.glob('values-*.yaml')))}.yaml"
        extra.write_text(yaml.safe_dump(values))
        args += ["--values", str(extra)]
    return args


def template(values_file: Path | None = None, values: dict[str, Any] | None = None,
             tmp_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`helm template` of the chart (values file first, then `values` over it)."""
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                *_value_args(values_file, values, tmp_dir))


def render(values_file: Path | None = None, values: dict[str, Any] | None = None,
           tmp_dir: Path | None = None) -> list[dict[str, Any]]:
    """The rendered objects; fails the test with helm's message when rendering fails."""
    result = template(values_file, values, tmp_dir)
    if result.returncode != 0:
        pytest.fail(f"helm template failed ({values_id(values_file)}):\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def render_text(values_file: Path | None = None, values: dict[str, Any] | None = None,
                tmp_dir: Path | None = None) -> str:
    result = template(values_file, values, tmp_dir)
    assert result.returncode == 0, result.stderr
    return result.stdout


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def workload(objects: list[dict[str, Any]]) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] in WORKLOAD_KINDS]
    assert len(found) == 1, [o["kind"] for o in found]
    return found[0]


def vllm_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = workload(objects)["spec"]["template"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == "vllm"]
    assert len(found) == 1, [c["name"] for c in containers]
    return found[0]


def command_line(objects: list[dict[str, Any]]) -> list[str]:
    """The vLLM container's command followed by its arguments."""
    container = vllm_container(objects)
    return [*container.get("command", []), *container.get("args", [])]


def flag_value(argv: list[str], flag: str) -> str | None:
    """The value after `flag` (or in `flag=value`); None when the flag is absent."""
    for i, arg in enumerate(argv):
        if arg == flag:
            assert i + 1 < len(argv), f"{flag} has no value in {argv}"
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def replace_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag`'s value replaced (the flag must be present once)."""
    out = list(argv)
    positions = [i for i, arg in enumerate(out) if arg == flag]
    assert len(positions) == 1, f"{flag} appears {len(positions)} times in {argv}"
    out[positions[0] + 1] = value
    return out


def config_map_file(objects: list[dict[str, Any]], path: str) -> str:
    """The text the pod sees at `path`: the ConfigMap key mounted there by the vLLM container."""
    container = vllm_container(objects)
    pod = workload(objects)["spec"]["template"]["spec"]
    folder, _, key = path.rpartition("/")
    mounts = [m for m in container["volumeMounts"] if m["mountPath"].rstrip("/") == folder]
    assert len(mounts) == 1, f"no single volume mounted at {folder}: {container['volumeMounts']}"
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert "configMap" in volume, f"{folder} is mounted from {volume}, not a ConfigMap"
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    assert key in config_map["data"], f"ConfigMap {config_map['metadata']['name']} has no key {key}"
    return config_map["data"][key]


def speculative_config(argv: list[str]) -> dict[str, Any] | None:
    value = flag_value(argv, "--speculative-config")
    return None if value is None else json.loads(value)


def load_values(values_file: Path | None) -> dict[str, Any]:
    """The chart's defaults with `values_file` merged over them (as Helm merges maps)."""
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    if values_file is not None:
        _merge(merged, yaml.safe_load(values_file.read_text()) or {})
    return merged


def _merge(base: dict[str, Any], over: dict[str, Any]) -> None:
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
