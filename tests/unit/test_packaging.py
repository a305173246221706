"""The package installs beside vLLM without changing it, and fails clearly without it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap


def run_python(code: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_general_plugin_entry_point_is_declared() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert {ep.name: ep.value for ep in eps}.get("adaptive") == "vllm_adaptive:register"


def test_no_logits_processor_entry_point() -> None:
    # vLLM loads that group in every engine, plugin opted in or not.
    eps = importlib.metadata.entry_points(group="vllm.logits_processors")
    assert not [ep for ep in eps if ep.value.startswith("vllm_adaptive")]


def test_using_the_plugin_without_vllm_says_which_extra_to_install() -> None:
    # The kernels import without vLLM (GPU benchmark machines have torch + Triton only).
    proc = run_python(
        """
        import importlib.util, sys
        real = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "vllm" else real(name, *a)
        import vllm_adaptive
        from vllm_adaptive.kernels import row_stats
        print("kernels imported")
        try:
            vllm_adaptive.engine_kwargs()
        except ImportError as e:
            print(e)
        """
    )
    assert "kernels imported" in proc.stdout
    assert "pip install 'vllm-adaptive[cpu]'" in proc.stdout
    assert "pip install 'vllm-adaptive[gpu]'" in proc.stdout


def test_kernels_and_patches_import_only_inside_the_package() -> None:
    proc = run_python(
        """
        import importlib.util
        print(importlib.util.find_spec("kernels"), importlib.util.find_spec("patches"))
        import vllm_adaptive.kernels, vllm_adaptive.patches
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "None", "ok"]


def test_register_is_idempotent_and_changes_no_engine_default() -> None:
    proc = run_python(
        """
        import vllm_adaptive
        from vllm.engine.arg_utils import EngineArgs
        vllm_adaptive.register(); vllm_adaptive.register()
        args = EngineArgs(model="m")
        print(args.logits_processors, "adaptive" in (args.additional_config or {}))
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-2:] == ["None", "False"]
