"""Which model writes each position: the per-engine policy behind EAD routing (issue #16).

Entropy Adaptive Decoding (arXiv 2502.06833) lets the small model write while the rolling mean
of its next-token entropy stays at or below tau, and hands over to the large model above it
(vllm_adaptive.routing.machine has the exact rule). In vLLM the small model is the draft model
and the large model the target: the target's verification forward is its catch-up on the small
model's tokens (both KV caches stay current), and a small-model position is accepted without
verification (vllm_adaptive.routing.gate). Per request, two modes:

- `faithful` (the paper): while the machine says SMALL, the draft is the small model's tokens,
  all forced; at the first LARGE position the draft stops and the target's own token there (the
  bonus) is the large model writing it; a draft that stays SMALL to K drops the bonus, since
  the owner of the next position is not known yet. In LARGE mode a row drafts nothing: the
  target writes one token per step.
- `speculative`: every step drafts K tokens; SMALL positions are forced, LARGE ones are verified
  losslessly as in ordinary speculation; a draft whose last position is SMALL drops the bonus
  (the next position's owner is decided from its entropy at the next step).

Requests that do not use EAD draft K tokens and are verified as usual, in the same batch.

The proposer (vllm_adaptive.speculative.proposer) calls, each engine step: `commit` (what the
previous step's verification emitted: the machine state of each request moves to the snapshot
after its emitted positions, and the small/large counts), `begin`, `record` per draft step
(entropy in bits before temperature, one machine step), `finish` (drafts and the plan for the
gate). The machine state lives on the device, one slot per request; per draft step nothing is
read back to the host except, on CPU, whether every row has stopped. On a CPU device
(`host_math`, the default there) the machine runs on numpy arrays instead of torch tensors: the
same rule (vllm_adaptive.routing.machine), without torch's dispatch cost of microseconds per op.

The first generated token of a request is the target's (the prefill samples it), and the small
model's entropy is seen only for positions it computed: the position after a full draft whose
bonus the target wrote (speculative mode) enters no window.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from vllm_adaptive.faults import injected_faults, raise_if_injected
from vllm_adaptive.routing.config import RoutingConfig
from vllm_adaptive.routing.gate import Receipt, RoutingPlan, RowPlan
from vllm_adaptive.routing.machine import SwitchParams, SwitchState, select_snapshots, switch_step
from vllm_adaptive.routing.params import RequestRouting
from vllm_adaptive.speculative.stop_rules import host_draft_stats

FAILURE_STAGES = ("commit", "begin", "draft", "finish", "gate")
# Stint-length histogram buckets (upper bounds, tokens); the last one is open.
STINT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LN2 = math.log(2.0)


def entropy_bits(logits: torch.Tensor) -> torch.Tensor:
    """[B] float64 entropy in bits of softmax(logits) per row (masked -inf entries count 0)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return (-plogp.sum(dim=-1)).double() / _LN2


def entropy_bits_host(logits: torch.Tensor) -> np.ndarray:
    """`entropy_bits` of CPU logits as a numpy float64 array [B] (numpy for small float32
    matrices, as `host_draft_stats`; float32 arithmetic like `entropy_bits`)."""
    stats = host_draft_stats(logits, None, entropy=True)
    assert stats.entropy is not None
    return stats.entropy.astype(np.float64) / _LN2


@dataclasses.dataclass
class RoutingCounters:
    """Totals since the engine started, over requests that use EAD (plain ints and lists)."""

    requests: int = 0  # EAD requests seen
    small_tokens: int = 0  # tokens the small model wrote (accepted without verification)
    large_tokens: int = 0  # tokens the large model wrote (its first token, bonus, recovered, verified)
    target_passes: int = 0  # (request, step) pairs that emitted tokens: sequential large-model passes
    draft_passes: int = 0  # draft forward passes run for steps with EAD rows (the first included)
    switches_to_large: int = 0
    switches_to_small: int = 0
    stint_histogram: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(STINT_BUCKETS) + 1))  # completed stints by length
    stint_tokens: int = 0  # positions written in the completed stints (the histogram's sum)
    forced_positions: int = 0  # positions accepted without verification at the gate
    vetoed_positions: int = 0  # planned as forced, verified because a constraint forbade the token
    bonus_dropped: int = 0
    plan_mismatches: int = 0  # planned rows whose scheduled draft was not the planned one
    failures: int = 0
    failure_stages: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FAILURE_STAGES, 0))


@dataclasses.dataclass
class EmittedRow:
    """What verification emitted for one batch row this step, as the proposer read it."""

    tokens: list[int] | None  # the emitted ids (None: one token, value not read)
    count: int  # tokens emitted (0 for a prompt chunk)
    forced: list[bool]  # per scheduled draft position: accepted without verification
    vetoed: int  # forced positions vetoed
    bonus_dropped: bool
    previous_output: int  # output tokens the request had before this step
    max_tokens: int | None
    min_tokens: int
    stop_ids: frozenset[int]

    def kept(self) -> int:
        """How many of the emitted tokens the request keeps (the scheduler cuts at max_tokens
        and at a stop token once min_tokens is reached)."""
        if self.tokens is None:
            return min(self.count, self._room())
        kept = 0
        for token in self.tokens[: self.count]:
            kept += 1
            produced = self.previous_output + kept
            if kept >= self._room():
                break
            if token in self.stop_ids and produced >= self.min_tokens:
                break
        return kept

    def _room(self) -> int:
        if self.max_tokens is None:
            return self.count
        return max(self.max_tokens - self.previous_output, 0)


class RoutedDraft:
    """One propose call's draft steps for a batch with EAD rows (device tensors per step, numpy
    machine arrays on the host path)."""

    def __init__(
        self, policy: RoutingPolicy, req_ids: list[str], k: int, routed: np.ndarray,
        faithful: np.ndarray, decoding: np.ndarray, params: SwitchParams, state: SwitchState,
        slots: np.ndarray | torch.Tensor,
    ) -> None:
        self.policy = policy
        self.req_ids = req_ids
        self.k = k
        self.routed = routed  # host [B] bool: EAD rows that decode this step
        self.faithful = faithful  # host [B] bool: routed rows in faithful mode
        self.params = params
        self.slots = slots
        self.host = state.host
        if self.host:
            self.faithful_t: np.ndarray | torch.Tensor = faithful.copy()
            self.active: np.ndarray | torch.Tensor = routed.copy()
        else:
            self.faithful_t = torch.from_numpy(faithful).to(state.large.device)
            self.active = torch.from_numpy(routed).to(state.large.device)
        # Speculative rows end their draft at their `large_draft`-th LARGE position (None: K).
        large_draft = policy.config.large_draft_tokens
        self.large_draft = None if large_draft is None or large_draft >= k else large_draft
        speculative = routed & ~faithful
        if self.large_draft is not None:
            if self.host:
                self.speculative_t: np.ndarray | torch.Tensor = speculative.copy()
                self.large_count: np.ndarray | torch.Tensor = np.zeros(len(req_ids), dtype=np.int64)
            else:
                self.speculative_t = torch.from_numpy(speculative).to(state.large.device)
                self.large_count = torch.zeros(len(req_ids), dtype=torch.int64, device=state.large.device)
        self.snapshots = [state]
        self.ran: list[np.ndarray | torch.Tensor] = []  # per step [B] bool: the machine stepped the row
        self.owners: list[np.ndarray | torch.Tensor] = []  # per step [B] bool: LARGE owns the position
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        # Rows that take all K steps (non-EAD decode rows, speculative EAD rows without a
        # large_draft_tokens end): while there are some, the loop never ends early.
        full = decoding & ~routed
        if self.large_draft is None:
            full = full | speculative
        self.full_length = bool(full.any())
        self.can_end_early = (not self.full_length) and (self.host or state.large.device.type == "cpu")
        # routing.min_drafting_fraction: the loop ends once fewer rows than this still draft.
        self.min_drafting = policy.config.min_drafting_fraction * int(routed.sum())
        self.failed = False

    @property
    def steps(self) -> int:
        return len(self.tokens)

    def entropy(self, logits: torch.Tensor) -> np.ndarray | torch.Tensor:
        """The small model's next-token entropy in bits per row, as `record` takes it."""
        return entropy_bits_host(logits) if self.host else entropy_bits(logits)

    def record(self, logits: torch.Tensor, token_ids: torch.Tensor | None, probs: torch.Tensor | None,
               entropy: np.ndarray | torch.Tensor) -> None:
        raise_if_injected("routing:draft")
        if self.steps >= self.k:
            raise RuntimeError(f"draft step {self.steps + 1} recorded, but K is {self.k}")
        if self.host and isinstance(entropy, torch.Tensor):
            entropy = entropy.cpu().numpy()
        active = self.active
        state, large = switch_step(self.snapshots[-1], self.params, entropy, active)
        self.snapshots.append(state)
        self.ran.append(active)
        self.owners.append(large & active)
        self.active = active & ~(large & self.faithful_t)
        if self.large_draft is not None:
            self.large_count = self.large_count + (large & active)
            self.active = self.active & ~(self.speculative_t & (self.large_count >= self.large_draft))
        if token_ids is not None:
            self.tokens.append(token_ids)
        if probs is not None:
            self.probs.append(probs)

    def should_end(self) -> bool:
        """No row needs all K steps, and no EAD row still drafts or fewer than
        routing.min_drafting_fraction of them do (CPU only: the read is a sync)."""
        if not self.can_end_early or self.steps >= self.k:
            return False
        drafting = int(self.active.sum())
        return drafting == 0 or drafting < self.min_drafting

    def draft_probs(self) -> torch.Tensor | None:
        return torch.stack(self.probs, dim=1).contiguous() if self.probs else None


@dataclasses.dataclass
class _Pending:
    """The last `finish`: what `commit` needs once verification has emitted."""

    step: int
    req_ids: list[str]
    routed: np.ndarray  # [B] bool
    steps_run: np.ndarray  # [B] int: machine steps per row
    owners: np.ndarray  # [B, steps] bool (LARGE)
    snapshots: list[SwitchState]
    slots: np.ndarray | torch.Tensor  # [B] int64
    start_large: np.ndarray  # [B] bool: the mode before this step's first position
    start_stint: np.ndarray  # [B] int


class RoutingPolicy:
    """Per-request machine state in device slots, the step's drafts and plan, counters.

    `host_math` (default: on a CPU device) keeps the machine in numpy arrays."""

    def __init__(self, config: RoutingConfig, num_speculative_tokens: int,
                 device: torch.device | str = "cpu", capacity: int = 64,
                 host_math: bool | None = None) -> None:
        if num_speculative_tokens < 1:
            raise ValueError(f"EAD needs num_speculative_tokens >= 1, got {num_speculative_tokens}")
        injected_faults()
        self.config = config
        self.k = num_speculative_tokens
        self.device = torch.device(device)
        self.host = self.device.type == "cpu" if host_math is None else bool(host_math)
        if self.host and self.device.type != "cpu":
            raise ValueError(f"host_math needs a CPU device, got {self.device}")
        self.store = self._start(capacity)
        self.slot_of: dict[str, int] = {}
        self._free = list(range(capacity - 1, -1, -1))
        self.routings: dict[str, RequestRouting | None] = {}
        self.step = 0
        self.pending: _Pending | None = None
        self.counters = RoutingCounters()
        self._params_key: tuple[str, ...] | None = None
        self._params: SwitchParams | None = None

    # --- per request ----------------------------------------------------------------------------

    def routing_of(self, req_id: str, parse: Callable[[], RequestRouting | None]) -> RequestRouting | None:
        """The request's EAD knobs (parsed once, by `parse`), None when it does not use EAD."""
        if req_id not in self.routings:
            routing = self.routings[req_id] = parse()
            if routing is not None:
                self.counters.requests += 1
        return self.routings[req_id]

    def forget(self, live: Callable[[str], bool]) -> None:
        """Drop the state of requests for which `live(req_id)` is false (finished)."""
        for req_id in [r for r in {*self.routings, *self.slot_of} if not live(r)]:
            self.routings.pop(req_id, None)
            slot = self.slot_of.pop(req_id, None)
            if slot is not None:
                self._free.append(slot)

    def _slot(self, req_id: str) -> int:
        slot = self.slot_of.get(req_id)
        if slot is None:
            if not self._free:
                self._grow()
            slot = self.slot_of[req_id] = self._free.pop()
            self.store.assign(self._index([slot]), self._start(1))
        return slot

    def _grow(self) -> None:
        old = self.store.large.shape[0]
        extra = self._start(old)
        self.store = SwitchState.cat([self.store, extra])
        self._free.extend(range(2 * old - 1, old - 1, -1))

    def _start(self, num_rows: int) -> SwitchState:
        return SwitchState.start(num_rows, self.config.max_window, self.device, host=self.host)

    def _index(self, values: Sequence[int]) -> np.ndarray | torch.Tensor:
        """int64 row indices for the store's arrays."""
        if self.host:
            return np.array(values, dtype=np.int64)
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    # --- one engine step ------------------------------------------------------------------------

    def commit(self, req_ids: Sequence[str], emitted: Sequence[EmittedRow | None]) -> None:
        """The previous step's verification emitted `emitted[i]` for row `req_ids[i]` (None: not
        an EAD row). Moves each EAD request's machine to the snapshot after its emitted
        positions and counts who wrote what."""
        pending, self.pending = self.pending, None
        raise_if_injected("routing:commit")
        counters = self.counters
        where = {} if pending is None else {r: i for i, r in enumerate(pending.req_ids)}
        rows: list[int] = []
        chosen: list[int] = []
        for i, (req_id, row) in enumerate(zip(req_ids, emitted)):
            if row is None or row.count == 0:
                continue
            kept = row.kept()
            if kept == 0:
                continue
            counters.target_passes += 1
            p = where.get(req_id)
            if pending is None or p is None or not pending.routed[p]:
                counters.large_tokens += kept
                continue
            accepted = row.count if row.bonus_dropped else row.count - 1
            small = sum(row.forced[: min(accepted, kept)])
            counters.small_tokens += small
            counters.large_tokens += kept - small
            counters.forced_positions += sum(row.forced)
            counters.vetoed_positions += row.vetoed
            counters.bonus_dropped += int(row.bonus_dropped)
            position = min(row.count, int(pending.steps_run[p]))
            rows.append(p)
            chosen.append(position)
            self._count_switches(pending, p, position)
        if pending is not None and rows:
            index = self._index(rows)
            committed = select_snapshots([s.select(index) for s in pending.snapshots], self._index(chosen))
            self.store.assign(pending.slots[index], committed)

    def _count_switches(self, pending: _Pending, row: int, positions: int) -> None:
        counters = self.counters
        large = bool(pending.start_large[row])
        stint = int(pending.start_stint[row])
        for owner in pending.owners[row, :positions].tolist():
            if owner != large:
                if owner:
                    counters.switches_to_large += 1
                else:
                    counters.switches_to_small += 1
                self._count_stint(stint)
                large, stint = owner, 0
            stint += 1

    def _count_stint(self, length: int) -> None:
        if length <= 0:
            return
        self.counters.stint_tokens += length
        histogram = self.counters.stint_histogram
        for b, bound in enumerate(STINT_BUCKETS):
            if length <= bound:
                histogram[b] += 1
                return
        histogram[-1] += 1

    def begin(
        self, req_ids: Sequence[str], routings: Sequence[RequestRouting | None],
        decoding: np.ndarray,
    ) -> RoutedDraft | None:
        """This step's draft, or None when no decoding row uses EAD (vLLM drafts as it does)."""
        self.step += 1
        decoding = np.asarray(decoding, dtype=bool)
        routed = np.fromiter((r is not None for r in routings), dtype=bool, count=len(routings)) & decoding
        if not routed.any():
            return None
        faithful = routed & np.fromiter(
            (r is not None and r.mode == "faithful" for r in routings), dtype=bool, count=len(routings))
        slots = self._index([self._slot(r) if on else 0 for r, on in zip(req_ids, routed.tolist())])
        state = self.store.select(slots)
        return RoutedDraft(self, list(req_ids), self.k, routed, faithful, decoding,
                           self._row_params(req_ids, routings), state, slots)

    def _row_params(self, req_ids: Sequence[str], routings: Sequence[RequestRouting | None]) -> SwitchParams:
        key = tuple(req_ids)
        if self._params is None or self._params_key != key:
            default = RequestRouting(tau=1.0, window=1, min_stint=0, mode="speculative")
            chosen = [r or default for r in routings]
            self._params = SwitchParams.from_lists(
                [r.tau for r in chosen], [r.window for r in chosen], [r.min_stint for r in chosen],
                device=self.device, max_window=self.config.max_window, host=self.host)
            self._params_key = key
        return self._params

    def finish(self, draft: RoutedDraft) -> tuple[list[list[int]], RoutingPlan]:
        """Each row's draft for the scheduler and the plan for the gate."""
        raise_if_injected("routing:finish")
        num_rows = len(draft.req_ids)
        steps = draft.steps
        if steps == 0:
            raise RuntimeError("the draft loop ran no step")
        tokens = torch.stack(draft.tokens, dim=1).to(torch.int64).cpu().numpy()
        start = draft.snapshots[0]
        if self.host:
            owners, ran = np.stack(draft.owners, axis=1), np.stack(draft.ran, axis=1)
            start_large, start_stint = start.large, start.stint
        else:
            owners = torch.stack(draft.owners, dim=1).cpu().numpy()
            ran = torch.stack(draft.ran, dim=1).cpu().numpy()
            start_large = start.large.cpu().numpy()
            start_stint = start.stint.cpu().numpy()
        steps_run = ran.sum(axis=1)
        drafts: list[list[int]] = []
        rows: dict[str, RowPlan] = {}
        for r in range(num_rows):
            row_tokens = tokens[r].tolist()
            if not draft.routed[r]:
                drafts.append(row_tokens)
                continue
            row_owners = owners[r, : steps_run[r]].tolist()
            if draft.faithful[r]:
                if True in row_owners:
                    n = row_owners.index(True)
                    plan = RowPlan(tuple(row_tokens[:n]), (True,) * n, drop_bonus=False)
                elif steps_run[r] == steps:  # still the small model's when the loop ended (K or cut)
                    plan = RowPlan(tuple(row_tokens[:steps]), (True,) * steps, drop_bonus=True)
                else:
                    raise RuntimeError(f"faithful row {r} stopped after {steps_run[r]} steps without LARGE")
            else:
                forced = tuple(not o for o in row_owners[: self.k])
                # The draft ended on a small-model position (at K, or the loop was cut): the next
                # one is probably its too, and its entropy is not known yet: as in faithful mode,
                # no target token after it. (A row's own draft end is a large-model position.)
                drop = bool(forced) and forced[-1]
                plan = RowPlan(tuple(row_tokens[: len(forced)]), forced, drop_bonus=drop)
            drafts.append(list(plan.tokens))
            if plan.tokens and any(plan.forced):
                rows[draft.req_ids[r]] = plan
        self.counters.draft_passes += max(steps, 1)
        self.pending = _Pending(self.step, draft.req_ids, draft.routed, steps_run, owners,
                                draft.snapshots, draft.slots, start_large, start_stint)
        return drafts, RoutingPlan(self.step, rows)

    def record_failure(self, stage: str) -> None:
        self.counters.failures += 1
        stages = self.counters.failure_stages
        stages[stage] = stages.get(stage, 0) + 1

    def add_gate_counts(self, mismatched: int, failures: int) -> None:
        self.counters.plan_mismatches += mismatched
        for _ in range(failures):
            self.record_failure("gate")

    def snapshot(self) -> dict[str, Any]:
        counters = dataclasses.asdict(self.counters)
        written = self.counters.small_tokens + self.counters.large_tokens
        return {
            "config": dataclasses.asdict(self.config),
            "num_speculative_tokens": self.k,
            "counters": counters,
            "large_fraction": self.counters.large_tokens / written if written else None,
            "target_passes_per_token": self.counters.target_passes / written if written else None,
        }

    metrics_snapshot = snapshot


def emitted_rows(
    receipt: Receipt | None, output: np.ndarray | None, forced: np.ndarray | None,
    vetoed: np.ndarray | None, req_ids: Sequence[str], routed_requests: Sequence[Any | None],
    discard: np.ndarray,
) -> list[EmittedRow | None]:
    """Per current row, what verification emitted (None for rows that do not use EAD).

    `routed_requests[i]`: the runner's request state of an EAD row (its sampling params and
    output so far), else None. `output` [B, K+1], `forced`/`vetoed` [total drafts]: the
    receipt's tensors on the host (None without a receipt: every row emitted one token)."""
    rows: list[EmittedRow | None] = []
    start = 0
    for i, request in enumerate(routed_requests):
        n = receipt.num_draft_tokens[i] if receipt is not None else 0
        if request is None:
            rows.append(None)
            start += n
            continue
        params = request.sampling_params
        stop_ids = set(params.stop_token_ids or ())
        if params.eos_token_id is not None:
            stop_ids.add(params.eos_token_id)
        common = dict(previous_output=len(request.output_token_ids), max_tokens=params.max_tokens,
                      min_tokens=params.min_tokens, stop_ids=frozenset(stop_ids))
        if discard[i]:
            rows.append(EmittedRow(None, 0, [], 0, False, **common))
        elif receipt is None or output is None:
            rows.append(EmittedRow(None, 1, [], 0, False, **common))
        else:
            tokens = [t for t in output[i].tolist() if t != -1]
            matched = receipt.matched[i]
            row_forced = forced[start : start + n].tolist() if matched else [False] * n
            row_vetoed = int(vetoed[start : start + n].sum()) if matched else 0
            rows.append(EmittedRow(tokens, len(tokens), row_forced, row_vetoed,
                                   receipt.bonus_dropped[i], **common))
        start += n
    return rows
