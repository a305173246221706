"""The `kvcache:` section of `AdaptiveConfig`: KV-cache compaction (issue #18).

With `enabled: true` the engine runs vllm_adaptive.kvcache.scheduler.CompactingScheduler (vLLM's
`scheduler_cls`) and the worker half (patches kv-compaction-plan and kv-compaction-offsets);
requests opt in with `kv_budget` in `vllm_xargs` (vllm_adaptive.kvcache.params), the other knobs
default to this section. Each bad value raises a `ConfigError` that starts with the field name
(`config._build` prefixes the section). It imports neither torch nor vLLM.
"""

from __future__ import annotations

import dataclasses

from vllm_adaptive.errors import ConfigError
from vllm_adaptive.sampling.param_spec import shown

# The selections the worker runs (vllm_adaptive.kvcache.selection): `streaming` (sinks + the most
# recent tokens), `snapkv` (attention mass from the last `window` queries, pooled), `h2o`
# (attention mass accumulated over every query the request has run), `keynorm` (low key norms).
# SCORED_BY_QUERIES need the workers to keep each request's last queries; ACCUMULATED, its
# accumulated attention.
KV_POLICIES = ("streaming", "snapkv", "h2o", "keynorm")
SCORED_BY_QUERIES = ("snapkv",)
ACCUMULATED = ("h2o",)
MAX_SINKS = 1024
MAX_BUFFER = 1 << 20
MAX_WINDOW = 1024
MAX_ENTROPY_MULTIPLIER = 1000.0


@dataclasses.dataclass(frozen=True)
class KVCompactionConfig:
    """Whether the deployment compacts requests that ask for it, and the defaults of their knobs."""

    # The deployment runs the compacting scheduler (requests still opt in with kv_budget).
    enabled: bool = False
    # Default kv_policy: how the kept tokens are chosen.
    policy: str = "streaming"
    # Default kv_sinks: the first tokens every compaction keeps.
    sinks: int = 4
    # Default kv_buffer: decode tokens a compacted request gathers before it is compacted again.
    buffer: int = 64
    # The scored policies' observation window: SnapKV scores tokens by the attention of the
    # request's last `window` queries; every scored selection also keeps the last `window` tokens.
    window: int = 32
    # Default kv_entropy_multiplier: a request with kv_budget "entropy" keeps this many times the
    # mean effective number of tokens (exp of the entropy) of its KV heads' window attention,
    # plus the sinks and the window (vllm_adaptive.kvcache.budget).
    entropy_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if self.policy not in KV_POLICIES:
            raise ConfigError(f"policy must be one of {list(KV_POLICIES)}, got {shown(self.policy)}")
        if not 0 <= self.sinks <= MAX_SINKS:
            raise ConfigError(f"sinks must be an integer in [0, {MAX_SINKS}], got {shown(self.sinks)}")
        if not 1 <= self.buffer <= MAX_BUFFER:
            raise ConfigError(f"buffer must be an integer in [1, {MAX_BUFFER}], got {shown(self.buffer)}")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"window must be an integer in [1, {MAX_WINDOW}], got {shown(self.window)}")
        if not (isinstance(self.entropy_multiplier, (int, float)) and not isinstance(self.entropy_multiplier, bool)
                and 0 < self.entropy_multiplier <= MAX_ENTROPY_MULTIPLIER):
            raise ConfigError(f"entropy_multiplier must be a number in (0, {MAX_ENTROPY_MULTIPLIER:g}], "
                              f"got {shown(self.entropy_multiplier)}")
