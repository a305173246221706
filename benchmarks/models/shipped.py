"""The trained models as the repository ships them: `models/adaptive-{draft,target,small}/`
(the speculative pair, and the small model that Entropy Adaptive Decoding routes with).

Each folder is a Hugging Face Llama folder (config, bfloat16 `model.safetensors`, tokenizer) plus
`manifest.json`: the training recipe's cache key, the weights' sha256, and the held-out figures
vLLM measured on these weights (`python -m benchmarks.evaluate`, greedy), with the tolerance within
which a retrained pair counts as reproducing them. `make serve` serves the shipped target as it
is, so a fresh machine needs no training; `make train` retrains from the recipe and compares its
figures with the manifest (`python -m benchmarks.models.train --verify`); `--ship` writes a
trained model here.

    python -m benchmarks.models.shipped --print-path target   # the verified folder, for scripts
    python -m benchmarks.models.shipped                       # every manifest's figures
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "models"
ROLES = ("draft", "target", "small")
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
# Files copied from a trained folder next to the converted weights.
FOLDER_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json")
# Held-out accuracy a retrained pair may differ by and still reproduce the manifest (absolute,
# per task, n=100): one seed's worth of host-to-host floating-point drift in a greedy model,
# far below the gap between a model that learnt a task and one that did not.
TOLERANCE = 0.08


class ShippedModelError(RuntimeError):
    """A shipped folder is missing or does not match its manifest; the message says what."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    name: str
    recipe_key: str  # benchmarks.models.train.cache_key of the recipe that trained the weights
    weights_sha256: str
    dtype: str
    parameters: int
    # task -> held-out accuracy measured by vLLM on these weights (greedy, seed, n below).
    accuracy: dict[str, float]
    evaluation: dict[str, object]  # command, seed, n, vllm version
    tolerance: float
    training: dict[str, object]  # seconds, final loss, gate results, torch version

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"


def folder(role: str) -> Path:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return ROOT / f"adaptive-{role}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(role: str) -> Manifest:
    path = folder(role) / MANIFEST
    if not path.is_file():
        raise ShippedModelError(f"{path} is missing: the repository ships the trained {role} there "
                                "(`python -m benchmarks.models.train --ship` writes it)")
    return Manifest(**json.loads(path.read_text()))


def verified(role: str) -> Path:
    """The shipped folder of `role`, after checking its weights against the manifest."""
    entry = manifest(role)
    weights = folder(role) / WEIGHTS
    if not weights.is_file():
        raise ShippedModelError(f"{weights} is missing")
    actual = sha256(weights)
    if actual != entry.weights_sha256:
        raise ShippedModelError(
            f"{weights}: sha256 {actual[:12]}... differs from the manifest's {entry.weights_sha256[:12]}... "
            "(a partial checkout, or weights changed without `--ship`)")
    return folder(role)


def differences(role: str, accuracy: Mapping[str, float]) -> list[str]:
    """Tasks whose accuracy differs from the manifest's by more than its tolerance."""
    entry = manifest(role)
    problems = []
    for task, expected in sorted(entry.accuracy.items()):
        if task not in accuracy:
            problems.append(f"{role} {task}: not measured")
        elif abs(accuracy[task] - expected) > entry.tolerance:
            problems.append(f"{role} {task}: {accuracy[task]:.2f}, manifest {expected:.2f} "
                            f"(tolerance {entry.tolerance:.2f})")
    return problems


def ship(role: str, trained: Path, accuracy: Mapping[str, float], evaluation: Mapping[str, object]) -> Path:
    """Write `trained` (a folder from benchmarks.models.train) as the shipped `role`, in bfloat16."""
    import torch
    from safetensors.torch import load_file, save_file

    record = json.loads((trained / "training.json").read_text())
    out = folder(role)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in FOLDER_FILES:
        if (trained / name).is_file():
            shutil.copy2(trained / name, tmp / name)
    config = json.loads((tmp / "config.json").read_text())
    config["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(trained / WEIGHTS).items()}
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    entry = Manifest(
        name=record["name"], recipe_key=record["key"], weights_sha256=sha256(tmp / WEIGHTS), dtype="bfloat16",
        parameters=int(record["parameters"]), accuracy={t: round(float(a), 4) for t, a in accuracy.items()},
        evaluation=dict(evaluation), tolerance=TOLERANCE,
        training={"seconds": record["seconds"], "final_loss": record["final_loss"], "torch": record["torch"],
                  "trainer_version": record["trainer_version"], "gate": record.get("gate", [])},
    )
    (tmp / MANIFEST).write_text(entry.to_json())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models.shipped", description=__doc__.splitlines()[0])
    parser.add_argument("--print-path", choices=ROLES, help="print only this role's verified folder")
    args = parser.parse_args(argv)
    try:
        if args.print_path:
            print(verified(args.print_path))
            return
        for role in ROLES:
            entry = manifest(role)
            verified(role)
            figures = ", ".join(f"{task} {value:.2f}" for task, value in sorted(entry.accuracy.items()))
            print(f"{role}: {folder(role)} ({entry.parameters / 1e6:.2f}M parameters, {entry.dtype}, "
                  f"recipe {entry.recipe_key}): {figures} (tolerance {entry.tolerance:.2f})")
    except ShippedModelError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
