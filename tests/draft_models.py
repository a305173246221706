"""Draft models for speculative-decoding tests, derived deterministically from a target model.

A draft made of random weights of its own agrees with a random target about as often as chance,
so every draft would be rejected at its first token and draft lengths would say nothing. A
draft that keeps the target's embeddings, final norm, LM head and first layers (and drops the
rest) is smaller, shares the tokenizer, and agrees with the target often but not always: what a
test of adaptive draft lengths needs. It is cached beside the target (under
`$VLLM_ADAPTIVE_CACHE/models`), in a folder keyed by the target's weights and the layer count.

A contrary draft (`ensure_contrary_draft`) is the whole target with its LM head's rows rotated
by one token and scaled up: its greedy token is always the one after the target's (so under
greedy verification the target never accepts a draft token), and it is sure of it (its top
probability is near 1). With it, what adaptive drafting should do does not depend on the
machine's speed: every draft token is wasted work, so the controller must end speculation.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# Files a target folder carries besides its weights and model config (the tokenizer's).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# How much a contrary draft scales the target's logits: the tiny random target's are nearly flat,
# and x30 puts the draft's top probability near 1.
CONTRARY_SHARPNESS = 30.0


def _weights_digest(model: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with (model / name).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:12]


def build_truncated_draft(target: Path, num_layers: int, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32)
    total = model.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"a draft needs 1..{total - 1} of the target's {total} layers, got {num_layers}")
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (target / name).exists():
            shutil.copy(target / name, out_dir / name)


def ensure_truncated_draft(target: Path, num_layers: int = 1) -> Path:
    """The folder of `target`'s first `num_layers` layers as a model, built if not cached."""
    folder = target.parent / f"{target.name}-draft-L{num_layers}-{_weights_digest(target)}"
    return _build_once(folder, lambda tmp: build_truncated_draft(target, num_layers, tmp))


def _build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`folder`, built by `build(tmp)` into a temporary folder renamed into place, if absent."""
    if (folder / "config.json").exists():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def build_contrary_draft(target: Path, out_dir: Path, sharpness: float) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32)
    if model.config.tie_word_embeddings:
        raise ValueError(f"{target}: a contrary draft needs an LM head of its own (tied embeddings)")
    head = model.get_output_embeddings()
    with torch.no_grad():
        # row v of the new head is row v - 1 of the target's: draft argmax = target argmax + 1
        head.weight.copy_(torch.roll(head.weight, shifts=1, dims=0) * sharpness)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (target / name).exists():
            shutil.copy(target / name, out_dir / name)


def ensure_contrary_draft(target: Path, sharpness: float = CONTRARY_SHARPNESS) -> Path:
    """The folder of `target`'s contrary draft (see the module docstring), built if not cached."""
    tag = f"{sharpness:g}".replace(".", "p")
    folder = target.parent / f"{target.name}-contrary-x{tag}-{_weights_digest(target)}"
    return _build_once(folder, lambda tmp: build_contrary_draft(target, tmp, sharpness))


def trained_pair() -> dict[str, Path]:
    """The trained draft and target the repository ships ({"draft": folder, "target": folder}:
    models/adaptive-*, checked against their manifests' sha256; never trains)."""
    from benchmarks.models import shipped

    return {role: shipped.verified(role) for role in ("draft", "target")}