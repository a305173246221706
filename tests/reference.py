"""Shared settings for tests that start vLLM, and the fixed prompts of the equality checks."""

from __future__ import annotations

# Small KV cache (bytes): on CPU the default would reserve 92% of host RAM per engine.
KV_CACHE_BYTES = 1 << 30
MAX_MODEL_LEN = 1024
SEED = 0

ENGINE_ARGS = {
    "kv_cache_memory_bytes": KV_CACHE_BYTES,
    "max_model_len": MAX_MODEL_LEN,
    "seed": SEED,
    # Logprobs of the final distribution (after our processor, top-k/top-p): lets tests measure
    # Mirostat's surprise. Identical on both sides of every plain-vs-plugin comparison.
    "logprobs_mode": "processed_logprobs",
}

GREEDY_PROMPTS = [
    "Hello world",
    "Q: 12 + 7 = ?\nA:",
    "The server answered the request with",
    "key abcde = 42; key fghij = 7; key abcde =",
    "user: model cache?\nassistant:",
    "One two three four five six seven",
]
GREEDY_MAX_TOKENS = 24
