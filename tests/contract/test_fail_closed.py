"""Fail closed: a vLLM whose internals moved keeps working without the plugin, and a deployment
that asks for the plugin stops at start-up with a message naming the patch that does not fit.

The moved vLLM is simulated by tests/moved_vllm/sitecustomize.py, which renames an identifier
throughout one vLLM module at import time (the method and its call sites), in every process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from vllm_processes import Server, start_server, stop_server, vllm_command

MOVED_VLLM = Path(__file__).parents[1] / "moved_vllm"
# The admission patch wraps InputProcessor._validate_params; upstream renames it.
RENAMED_ADMISSION = "vllm.v1.engine.input_processor:_validate_params:_check_request_params"
# The adaptive proposer overrides SpecDecodeBaseProposer._sample_draft_tokens; upstream renames it.
RENAMED_DRAFT_SAMPLING = "vllm.v1.spec_decode.llm_base_proposer:_sample_draft_tokens:_draft_next_tokens"


def moved_env(rename: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(MOVED_VLLM), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "VLLM_ADAPTIVE_TEST_RENAME": rename}


def run_python(script: str, rename: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], env={**os.environ, **moved_env(rename)},
                          capture_output=True, text=True, timeout=300)


def test_registration_leaves_vllm_untouched_and_offline_opt_in_names_the_patch() -> None:
    script = (
        "import vllm_adaptive\n"
        "vllm_adaptive.register()\n"  # must not raise
        "from vllm.engine.arg_utils import EngineArgs\n"
        "from vllm.v1.engine.input_processor import InputProcessor\n"
        "assert hasattr(InputProcessor, '_check_request_params')\n"
        "assert not hasattr(InputProcessor, '_validate_params')\n"
        "mark = '__vllm_adaptive_original__'\n"
        "assert not hasattr(EngineArgs.__dict__['add_cli_args'].__func__, mark), 'cli-flags applied'\n"
        "assert not hasattr(EngineArgs.__dict__['from_cli_args'].__func__, mark), 'cli-opt-in applied'\n"
        "from vllm_adaptive.plugin import PluginUnavailableError\n"
        "try:\n"
        "    vllm_adaptive.engine_kwargs({'sampling': {'mirostat_tau': 3.0}})\n"
        "except PluginUnavailableError as e:\n"
        "    print('REFUSED', e)\n"
    )
    proc = run_python(script, RENAMED_ADMISSION)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused, proc.stdout
    assert "'spec-decode-admission'" in refused[0] and "0.32.x" in refused[0]
    assert "InputProcessor._validate_params" in refused[0]


def test_adaptive_drafting_on_a_moved_proposer_is_refused_before_the_engine_starts() -> None:
    """The proposer patch checks its contract when vLLM's runner is imported (in workers): the
    runner keeps vLLM's own proposer, and opting in to adaptive drafting stops in the frontend."""
    script = (
        "import vllm_adaptive\n"
        "vllm_adaptive.register()\n"
        "import vllm.v1.worker.gpu_model_runner as runner\n"
        "from vllm.v1.spec_decode.draft_model import DraftModelProposer\n"
        "assert runner.DraftModelProposer is DraftModelProposer, runner.DraftModelProposer\n"
        "from vllm_adaptive.plugin import PluginUnavailableError\n"
        "try:\n"
        "    vllm_adaptive.engine_kwargs({'speculative': {'enabled': True}},\n"
        "        speculative_config={'method': 'draft_model', 'model': '/nonexistent'})\n"
        "except PluginUnavailableError as e:\n"
        "    print('REFUSED', e)\n"
    )
    proc = run_python(script, RENAMED_DRAFT_SAMPLING)
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused = [line for line in proc.stdout.splitlines() if line.startswith("REFUSED")]
    assert refused and "'adaptive-draft-proposer'" in refused[0], proc.stdout + proc.stderr[-2000:]


@pytest.mark.server
def test_plain_vllm_serve_still_answers_on_a_moved_vllm(tiny_model: Path, tmp_path: Path) -> None:
    server: Server = start_server(tiny_model, [], tmp_path / "plain.log", env=moved_env(RENAMED_ADMISSION))
    try:
        response = requests.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": server.model, "prompt": "Hello world", "max_tokens": 4, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    finally:
        stop_server(server)
    assert "patch 'spec-decode-admission'" in server.log.read_text(errors="replace")


@pytest.mark.server
def test_serve_with_the_plugin_stops_at_start_up_naming_the_patch(tiny_model: Path) -> None:
    proc = subprocess.run(
        [*vllm_command(), "serve", str(tiny_model), "--plugin", "adaptive", "--port", "1"],
        env={**os.environ, **moved_env(RENAMED_ADMISSION)}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "patch 'spec-decode-admission'" in output and "supports vLLM 0.32.x" in output, output[-3000:]
    assert "Application startup complete" not in output
