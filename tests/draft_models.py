"""Draft models for speculative-decoding tests, derived deterministically from a target model.

A draft made of random weights of its own agrees with a random target about as often as chance,
so every draft would be rejected at its first token and draft lengths would say nothing. A
draft that keeps the target's embeddings, final norm, LM head and first layers (and drops the
rest) is smaller, shares the tokenizer, and agrees with the target often but not always: what a
test of adaptive draft lengths needs. It is cached beside the target (under
`$VLLM_ADAPTIVE_CACHE/models`), in a folder keyed by the target's weights and the layer count.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

# Files a target folder carries besides its weights and model config (the tokenizer's).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


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
    if (folder / "config.json").exists():
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build_truncated_draft(target, num_layers, tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
