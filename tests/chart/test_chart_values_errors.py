"""Bad values stop `helm template` with a message naming the key to change; bad plugin settings
inside `adaptive:` are refused by the plugin's own validation of the rendered ConfigMap.

Single keys and types are checked by values.schema.json (Helm prints the key's JSON path);
rules across keys by the chart's templates (`fail` with the key's dotted name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from chart_tools import config_map_file, render, template

from vllm_adaptive.config import AdaptiveConfig
from vllm_adaptive.errors import ConfigError

TOKEN = "hf_" + "aBcD1234" * 4

BAD_VALUES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown top-level key", {"replicas": 2}, ["additional properties 'replicas' not allowed"]),
    ("unknown nested key", {"server": {"prot": 8000}}, ["/server", "'prot'"]),
    ("wrong type", {"replicaCount": "two"}, ["/replicaCount", "want integer"]),
    ("wrong type of a list", {"server": {"extraArgs": "--enable-prefix-caching"}}, ["/server/extraArgs", "want array"]),
    ("negative GPU count", {"gpu": {"count": -1}}, ["/gpu/count", "minimum"]),
    ("no GPU with the GPU image", {"gpu": {"count": 0}}, ["gpu.count must be at least 1 with device: gpu"]),
    ("GPU asked for with the CPU image", {"device": "cpu", "gpu": {"count": 1}}, ["gpu.count must be 0 with device: cpu"]),
    ("tensor parallel size differs from the GPU count", {"gpu": {"count": 1}, "parallelism": {"tensorParallelSize": 2}},
     ["gpu.count (1)", "parallelism.tensorParallelSize (2)", "parallelism.pipelineParallelSize (1)"]),
    ("tp * pp differs from the GPU count", {"gpu": {"count": 2}, "parallelism": {"tensorParallelSize": 2, "pipelineParallelSize": 2}},
     ["gpu.count (2)", "parallelism.pipelineParallelSize (2) = 4"]),
    ("literal hub token", {"model": {"hfToken": TOKEN}}, ["/model/hfToken", "got string, want object"]),
    ("literal token beside the secret reference", {"model": {"hfToken": {"secretName": "t", "value": TOKEN}}},
     ["/model/hfToken", "'value' not allowed"]),
    ("literal token in env", {"server": {"env": [{"name": "HF_TOKEN", "value": TOKEN}]}},
     ["server.env[0] (HF_TOKEN) holds a literal secret"]),
    ("token-like env value", {"server": {"env": [{"name": "MY_VAR", "value": TOKEN}]}}, ["server.env[0] (MY_VAR)"]),
    ("token flag in extra args", {"server": {"extraArgs": ["--max-num-seqs", "8", f"--hf-token={TOKEN}"]}},
     ["server.extraArgs[2] (--hf-token) is set by the chart"]),
    ("flag the chart owns", {"server": {"extraArgs": ["--tensor-parallel-size", "2"]}},
     ["server.extraArgs[0] (--tensor-parallel-size)"]),
    ("image digest that is not one", {"image": {"digest": "latest"}}, ["/image/digest"]),
    ("unknown adaptive key", {"adaptive": {"sampling": {"mirostat_tua": 3.0}}},
     ["/adaptive/sampling", "'mirostat_tua' not allowed"]),
    ("unknown adaptive section", {"adaptive": {"samplers": {}}}, ["/adaptive", "'samplers' not allowed"]),
    ("adaptive value of the wrong type", {"adaptive": {"speculative": {"max_draft_tokens": "eight"}}},
     ["/adaptive/speculative/max_draft_tokens"]),
    ("adaptive choice outside its set", {"adaptive": {"speculative": {"stop_rule": "sometimes"}}},
     ["/adaptive/speculative/stop_rule"]),
    ("adaptive drafting without a draft model", {"adaptive": {"speculative": {"enabled": True}}},
     ["adaptive.speculative.enabled needs vLLM's draft-model speculation"]),
    ("adaptive drafting with tensor parallelism",
     {"adaptive": {"speculative": {"enabled": True}}, "speculative": {"enabled": True, "draftModel": "d"},
      "gpu": {"count": 2}, "parallelism": {"tensorParallelSize": 2}},
     ["adaptive.speculative.enabled needs parallelism.tensorParallelSize"]),
    ("draft tokens differ from max_draft_tokens",
     {"adaptive": {"speculative": {"enabled": True, "max_draft_tokens": 4}},
      "speculative": {"enabled": True, "draftModel": "d", "numSpeculativeTokens": 6}},
     ["speculative.numSpeculativeTokens (6) must equal adaptive.speculative.max_draft_tokens (4)"]),
    ("speculation without a draft model", {"speculative": {"enabled": True}}, ["speculative.draftModel is required"]),
    ("both autoscalers", {"autoscaling": {"hpa": {"enabled": True}, "keda": {"enabled": True}}},
     ["autoscaling.hpa.enabled and autoscaling.keda.enabled"]),
    ("pvc source without a claim", {"model": {"source": "pvc", "path": "m"}}, ["model.existingClaim is required"]),
    ("prefetch of a local model", {"model": {"source": "hostPath", "hostPath": "/mnt/m"}, "cache": {"prefetch": {"enabled": True}}},
     ["cache.prefetch.enabled needs model.source: hub"]),
]


@pytest.mark.parametrize("values,expected", [(v, e) for _, v, e in BAD_VALUES], ids=[name for name, _, _ in BAD_VALUES])
def test_bad_values_fail_helm_template_naming_the_key(values: dict[str, Any], expected: list[str], tmp_path: Path) -> None:
    result = template(values=values, tmp_dir=tmp_path)
    assert result.returncode != 0, f"rendered although bad:\n{result.stdout[:2000]}"
    for fragment in expected:
        assert fragment in result.stderr, result.stderr
    assert TOKEN not in result.stderr  # errors never echo a token


BAD_PLUGIN_SETTINGS: list[tuple[dict[str, Any], str]] = [
    ({"sampling": {"mirostat_tau": -1.0}}, "sampling.mirostat_tau must be a number in"),
    ({"sampling": {"typical_p": 1.5}}, "sampling.typical_p"),
    ({"speculative": {"max_draft_tokens": 500}}, "speculative.max_draft_tokens must be an integer in [1, 128]"),
    ({"speculative": {"specdec_threshold": 1.0}}, "speculative.specdec_threshold"),
]


@pytest.mark.parametrize("adaptive,expected", BAD_PLUGIN_SETTINGS, ids=[e.split()[0] for _, e in BAD_PLUGIN_SETTINGS])
def test_bad_plugin_setting_is_refused_by_the_plugins_validation_of_the_rendered_config(
    adaptive: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    """Ranges are the plugin's: the chart renders the value unchanged, and the plugin's own
    validation (what `vllm serve --adaptive-config` runs at start-up) names the key."""
    objects = render(values={"adaptive": adaptive}, tmp_dir=tmp_path)
    path = tmp_path / "adaptive.yaml"
    path.write_text(config_map_file(objects, "/etc/vllm-adaptive/adaptive.yaml"))
    with pytest.raises(ConfigError) as error:
        AdaptiveConfig.from_file(path)
    assert expected in str(error.value)
