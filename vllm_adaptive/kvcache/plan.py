"""What the scheduler half of KV compaction tells the workers each step (no vLLM imports: both
the engine core and the workers read it).

The scheduler (vllm_adaptive.kvcache.scheduler) attaches a `KVPlan` to vLLM's SchedulerOutput as
the attribute PLAN_ATTRIBUTE; SchedulerOutput is a non-slots dataclass that pickles extra
attributes to the workers (tests/contract/test_kv_compaction_facts.py). The workers
(vllm_adaptive.kvcache.worker) move each compacted request's kept tokens into its first slots
before anything else happens in the step, and shift the slots of every compacted request by its
eviction offset.
"""

from __future__ import annotations

import dataclasses

PLAN_ATTRIBUTE = "adaptive_kv"
# The attribute of vLLM's ModelRunnerOutput that carries the workers' reports back (patch
# kv-compaction-reports): request id -> the mean effective number of attended tokens over its
# layers and KV heads (`budget.effective_tokens` of its window's attention), or None where the
# workers could not measure it.
REPORT_ATTRIBUTE = "adaptive_kv_reports"


@dataclasses.dataclass(frozen=True)
class Compaction:
    """One request compacted this step: it held `physical` tokens and keeps `keep`, chosen per
    layer and KV head by `policy` (vllm_adaptive.kvcache.selection): always the first `sinks`
    tokens; `streaming` fills the rest with the most recent tokens, the scored policies keep the
    last `recent` tokens and the best-scoring ones between."""

    physical: int
    keep: int
    sinks: int = 4
    policy: str = "streaming"
    recent: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.keep <= self.physical:
            raise ValueError(f"keep must be in [1, physical={self.physical}], got {self.keep}")
        if not 0 <= self.sinks <= self.keep:
            raise ValueError(f"sinks must be in [0, keep={self.keep}], got {self.sinks}")
        if self.recent < 0:
            raise ValueError(f"recent must be >= 0, got {self.recent}")

    @property
    def evicted(self) -> int:
        return self.physical - self.keep

    def kept_tokens(self) -> list[int]:
        """The streaming selection's physical indices, ascending: the sinks, then the most
        recent (also the fallback of a scored policy whose scores are missing)."""
        recent = self.keep - self.sinks
        return [*range(self.sinks), *range(self.physical - recent, self.physical)]


@dataclasses.dataclass(frozen=True)
class KVPlan:
    """This step's compactions (run before any forward pass), the eviction offset E of every
    compacted request still in the scheduler (its physical length = logical length - E), and
    the requests whose last `window` queries the workers keep for a scored policy (request id ->
    window; every running one, so a request missing here is gone and its queries are dropped),
    and those whose accumulated attention they keep (`h2o`, same rule)."""

    step: int
    compact: dict[str, Compaction]
    evicted: dict[str, int]
    observe: dict[str, int] = dataclasses.field(default_factory=dict)
    # Running requests whose attention mass the workers accumulate (H2O), every running one.
    accumulate: tuple[str, ...] = ()
    # Requests with the entropy budget rule whose window the workers measure this step (request
    # id -> its physical length), before any forward pass; the answer comes back in the step's
    # output (REPORT_ATTRIBUTE).
    measure: dict[str, int] = dataclasses.field(default_factory=dict)
