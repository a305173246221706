"""Tiny random-weight Llama models, built deterministically, for plumbing tests and the demo.

`python -m benchmarks.models.tiny` builds the default model (if absent) and prints its path.
Models are cached under `$VLLM_ADAPTIVE_CACHE` (default `~/.cache/vllm-adaptive`), in a folder
keyed by a hash of the spec, so a changed spec never reuses a stale model.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.models.tokenizer import save_tokenizer, train_tokenizer

BUILDER_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of a tiny Llama. head_dim = hidden_size / num_heads must be >= 32 for CPU attention."""

    name: str = "tiny-llama"
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 4096
    initializer_range: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads} heads")
        if self.hidden_size // self.num_heads < 32:
            raise ValueError(
                f"head_dim {self.hidden_size // self.num_heads} < 32: vLLM's CPU attention needs >= 32"
            )

    def key(self) -> str:
        """Cache key: the shape, the builder's version and the tokenizer the model is built with."""
        blob = json.dumps(
            {**dataclasses.asdict(self), "builder": BUILDER_VERSION,
             "tokenizer": tokenizer_fingerprint(self.vocab_size)},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def tokenizer_fingerprint(vocab_size: int) -> str:
    """sha256 of the tokenizer JSON: a changed tokenizer (or corpus) means a new model folder."""
    return hashlib.sha256(train_tokenizer(vocab_size).to_str().encode()).hexdigest()


def cache_root() -> Path:
    return Path(os.environ.get("VLLM_ADAPTIVE_CACHE", Path.home() / ".cache" / "vllm-adaptive"))


def model_dir(spec: TinyLlamaSpec) -> Path:
    return cache_root() / "models" / f"{spec.name}-{spec.key()}"


def build_tiny_llama(spec: TinyLlamaSpec, out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(spec.vocab_size)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.token_to_id("<s>"),
        eos_token_id=tokenizer.token_to_id("</s>"),
        pad_token_id=tokenizer.token_to_id("<pad>"),
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir, spec.max_position_embeddings)


def ensure_tiny_llama(spec: TinyLlamaSpec | None = None) -> Path:
    """Return the model folder for `spec`, building it first if it is not cached."""
    spec = spec or TinyLlamaSpec()
    target = model_dir(spec)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build_tiny_llama(spec, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process built it first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    print(ensure_tiny_llama())


if __name__ == "__main__":
    main()
