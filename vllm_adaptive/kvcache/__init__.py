"""KV-cache compaction (issue #18): which tokens a request keeps and how many.

Built so far (no engine integration yet; nothing here runs inside vLLM):
- `selection`: scorers (SnapKV pooling, H2O, key norm, streaming) and the per-head selection;
- `budget`: budget rules (fixed, ratio, entropy) and triggers;
- kernels/kv_score.py: the observation window's attention mass on the paged cache;
- kernels/kv_compact.py: moving each head's kept tokens to the request's first slots.
The plan for the rest, and what was verified about vLLM, is in docs/dev/kv_compaction.md.
"""
