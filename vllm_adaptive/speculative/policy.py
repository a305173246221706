"""How long is each request's draft this step? The per-engine policy behind the adaptive proposer.

`DraftLengthPolicy` holds what adaptive draft length needs across steps, and nothing of vLLM:

- the stop rule the config names (`stop_rules.build_stop_rule`), run on every draft step's
  distribution for every row (`DraftInProgress.record`); a row stops when its rule fires, and
  its draft is the prefix of tokens the rule kept;
- what each request drafted, kept until verification reports how many tokens the target accepted
  (`observe_verification`); that feeds the `AcceptanceCalibrator` (SpecDec++'s a_i), each
  request's AdaEDL lambda (Algorithm 1), and each request's acceptance rate for the controller;
- the `GoodputController`, which caps K for the whole batch from measured step times
  (`observe_step`), when the config turns it on;
- counters an operator (or a test) reads through `vllm_adaptive.introspection`, among them the
  failures the proposer caught, by stage (FAILURE_STAGES).

The proposer (`vllm_adaptive.speculative.proposer`) calls it in this order each engine step:
`observe_verification` (the previous step's drafts), `begin` (K), `record` per draft step,
`finish` (the drafts), `observe_step` (timings).

No host work per row or per draft step (issue #17), after vLLM's MinP processor and its
spec-decode policies:

- per-request state lives in arrays indexed by batch row (`RowStates`); they follow the batch
  when its rows change (`RowStates.align`: Python per row only then), and a request that leaves
  the batch keeps its state aside in case it comes back;
- a draft's tokens, kept flags and confidences go into [rows, K] device buffers; the alive mask
  stays on the device. Whether every row has stopped (the loop's early exit) is read from the
  device `alive_check_lag` steps late: 0 on CPU, where reading it costs nothing and a draft pass
  does, 1 on a GPU, where the flag of step s is copied non-blocking into pinned memory and read
  after step s + 1 is queued, so the device never drains. The extra step a lag may run drafts
  only for rows that have stopped: its tokens are never kept, so drafts, verification and
  greedy output are the same as with the check at every step;
- `finish` reads the drafts with one copy per step (the proposer must hand vLLM host lists).

On a CPU device (`host_math`, the default there) the same decisions run in numpy after the
vocabulary reductions: a small torch op costs several microseconds of dispatch on a CPU, a numpy
op on [rows] a fraction of one, and the policy makes some 20 of them per draft step. The rules'
`decide_host`, the calibrator's `*_host` and AdaEDL's `update_lambda_host` are the numpy forms
(tests/unit/test_spec_policy_host_math.py holds the two paths to the same drafts).

Each stage has a fault point (`vllm_adaptive.faults`, off unless VLLM_ADAPTIVE_FAULT_INJECT
names it): `spec:feedback`, `spec:controller`, `spec:stop_rule`, `spec:finish`, so that tests can
prove that the proposer's fallback for each stage serves the step in a real engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from vllm_adaptive.faults import injected_faults, raise_if_injected
from vllm_adaptive.speculative.config import AUTO, DEFAULT_DRAFT_COST_RATIO, AdaptiveDraftConfig
from vllm_adaptive.speculative.controller import GoodputController
from vllm_adaptive.speculative.stop_rules import (
    AdaEDLStopRule,
    DraftState,
    OneRowStats,
    SpecDecStopRule,
    StopRule,
    build_calibrator,
    build_stop_rule,
    draft_stats,
    draft_stats_from_probs,
    f32,
    host_draft_stats,
    host_row_stats,
    host_to_device,
    threshold_for_cost_ratio,
)

# Verification time above this many times the time model's prediction (or above
# IDLE_SECONDS before it has one) contains engine idle time, not a step: it is not a sample.
IDLE_FACTOR = 5.0
IDLE_SECONDS = 1.0
# Per-request acceptance counts for the controller decay by this factor per verification.
ACCEPTANCE_DECAY = 0.9
# Where in a step adaptive drafting can fail (the proposer counts each failure under one):
# learning from the previous drafts' verification, choosing the cap K (controller, SpecDec++
# threshold), the stop rule at a draft step, and collecting the drafts and timings.
FAILURE_STAGES = ("feedback", "controller", "stop_rule", "finish")
# Draft steps between a step's stop decisions and the host reading whether every row stopped,
# on a device that runs asynchronously (CUDA); on CPU the read costs nothing: 0.
DEVICE_ALIVE_CHECK_LAG = 1


def default_alive_check_lag(device: torch.device) -> int:
    return 0 if device.type == "cpu" else DEVICE_ALIVE_CHECK_LAG


@dataclasses.dataclass
class DraftCounters:
    """Totals since the engine started (plain ints: cheap to read across processes)."""

    proposals: int = 0  # propose calls with adaptive drafting
    draft_rows: int = 0  # decode rows that got a draft decision
    draft_tokens: int = 0  # draft tokens returned to the scheduler
    draft_passes: int = 0  # draft forward passes run (the first pass included)
    early_exits: int = 0  # proposals whose draft loop ended before K because every row stopped
    rule_stops: int = 0  # decode rows whose stop rule ended the draft before the cap K
    cap_reached: int = 0  # decode rows whose draft reached the cap K (K = 0 included)
    verified_drafts: int = 0  # drafts whose verification was observed
    verified_tokens: int = 0  # their draft tokens
    accepted_tokens: int = 0  # of which the target accepted
    failures: int = 0  # internal errors; that step fell back to fixed-K drafting
    failure_stages: dict[str, int] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(FAILURE_STAGES, 0))  # failures by stage
    length_histogram: list[int] = dataclasses.field(default_factory=list)  # rows by draft length
    cap_histogram: list[int] = dataclasses.field(default_factory=list)  # proposals by cap K


# Per-request values kept across steps, one float64 array each (index: batch row).
#   lam: AdaEDL threshold lambda; acceptance_ema: AdaEDL's AR (EMA of accepted / drafted);
#   accepted / observed: decayed counts of accepted draft tokens and of draft tokens verification
#   tested (censoring aside), the request's acceptance for the controller.
REQUEST_FIELDS = ("lam", "acceptance_ema", "accepted", "observed")


class RowStates:
    """Per-request state in arrays indexed by the batch's rows, plus each row's last draft.

    `align(req_ids)` makes row r hold request req_ids[r]: the arrays are permuted when the batch
    was reordered, rows of requests that left are set aside (`departed`, restored if the request
    comes back; dropped when it grows past DEPARTED_LIMIT_FACTOR times the batch, as a finished
    request never comes back), and new requests start at `initial`. A batch in the same order as
    the last one costs one list comparison. A row's last draft (`pending_*`) is not set aside: a
    request that left between its draft and the draft's verification learns nothing from it.
    """

    DEPARTED_LIMIT_FACTOR = 4

    def __init__(self, width: int, initial: dict[str, float]) -> None:
        self.width = width
        self.initial = initial
        self.req_ids: list[str] = []
        self.values = {name: np.zeros(0, dtype=np.float64) for name in REQUEST_FIELDS}
        self.pending_len = np.zeros(0, dtype=np.int64)  # -1: no draft awaiting verification
        self.pending_tokens: list[list[int]] = []  # the lists `finish` returned (no copy)
        self.pending_conf = np.zeros((0, width), dtype=np.float32)
        self.departed: dict[str, tuple[float, ...]] = {}

    def __getattr__(self, name: str) -> np.ndarray:
        values = self.__dict__.get("values")
        if values is not None and name in values:
            return values[name]
        raise AttributeError(name)

    def align(self, req_ids: Sequence[str]) -> None:
        if len(req_ids) == len(self.req_ids) and list(req_ids) == self.req_ids:
            return
        req_ids = list(req_ids)
        old_rows = {r: i for i, r in enumerate(self.req_ids)}
        source = np.fromiter((old_rows.get(r, -1) for r in req_ids), dtype=np.int64, count=len(req_ids))
        new = source < 0
        gather = np.maximum(source, 0)
        current = set(req_ids)
        left = [(r, i) for r, i in old_rows.items() if r not in current]
        for r, i in left:
            self.departed[r] = tuple(float(self.values[name][i]) for name in REQUEST_FIELDS)
        values = {}
        for name, array in self.values.items():
            aligned = array[gather] if len(array) else np.zeros(len(req_ids), dtype=np.float64)
            aligned[new] = self.initial[name]
            values[name] = aligned
        self.values = values
        for row in np.flatnonzero(new).tolist():
            stored = self.departed.pop(req_ids[row], None)
            if stored is not None:
                for name, value in zip(REQUEST_FIELDS, stored):
                    values[name][row] = value
        if len(self.pending_len):
            self.pending_len = np.where(new, -1, self.pending_len[gather])
            self.pending_tokens = [self.pending_tokens[i] for i in gather.tolist()]
            self.pending_conf = self.pending_conf[gather]
        else:
            self.pending_len = np.full(len(req_ids), -1, dtype=np.int64)
            self.pending_tokens = [[] for _ in req_ids]
            self.pending_conf = np.zeros((len(req_ids), self.width), dtype=np.float32)
        if len(self.departed) + len(req_ids) > self.DEPARTED_LIMIT_FACTOR * max(len(req_ids), 64):
            self.departed.clear()
        self.req_ids = req_ids

    def get(self, req_id: str) -> dict[str, float] | None:
        """One request's values (introspection and tests; not for the hot path)."""
        if req_id in self.req_ids:
            row = self.req_ids.index(req_id)
            return {name: float(self.values[name][row]) for name in REQUEST_FIELDS}
        stored = self.departed.get(req_id)
        return None if stored is None else dict(zip(REQUEST_FIELDS, stored))

    def set(self, req_id: str, name: str, value: float) -> None:
        if req_id in self.req_ids:
            self.values[name][self.req_ids.index(req_id)] = value
        elif req_id in self.departed:
            stored = dict(zip(REQUEST_FIELDS, self.departed[req_id]))
            stored[name] = value
            self.departed[req_id] = tuple(stored[n] for n in REQUEST_FIELDS)
        else:
            raise KeyError(req_id)

    def known(self) -> Iterator[str]:
        yield from self.req_ids
        yield from self.departed


class RequestView:
    """Read/write view of one request's values in `RowStates` (introspection and tests)."""

    def __init__(self, rows: RowStates, req_id: str) -> None:
        object.__setattr__(self, "_rows", rows)
        object.__setattr__(self, "_req_id", req_id)

    def __getattr__(self, name: str) -> float:
        if name not in REQUEST_FIELDS:
            raise AttributeError(name)
        values = self._rows.get(self._req_id)
        if values is None:
            raise KeyError(self._req_id)
        return values[name]

    def __setattr__(self, name: str, value: float) -> None:
        if name not in REQUEST_FIELDS:
            raise AttributeError(name)
        self._rows.set(self._req_id, name, float(value))


class DraftInProgress:
    """The draft steps of one propose call: per step tokens, kept rows and confidences on the
    device; the alive mask on the device (see the module docstring)."""

    def __init__(
        self, policy: DraftLengthPolicy, num_rows: int, k: int, lam: torch.Tensor | np.ndarray,
        alive_check_lag: int = 0,
    ) -> None:
        """`lam` [num_rows]: each row's AdaEDL lambda, a device tensor, or a numpy float32 array
        for the host path (numpy decisions, the alive mask on the host, no lag)."""
        if alive_check_lag < 0:
            raise ValueError(f"alive_check_lag must be >= 0, got {alive_check_lag}")
        self.policy = policy
        self.k = k
        self.num_rows = num_rows
        self.host = isinstance(lam, np.ndarray)
        self.lag = 0 if self.host else alive_check_lag
        # One [B] array per step, stacked once in `finish` (cheaper than writing a column of
        # a [B, K] buffer per step: one stack against K strided writes).
        self.tokens: list[Any] = []
        self.kept: list[Any] = []
        self.confidence: list[Any] = []
        self.probs: list[torch.Tensor] = []
        self.failed = False
        if self.host:
            assert isinstance(lam, np.ndarray)
            self._lam = lam.astype(np.float32, copy=False)
            self._log_survival = np.zeros(num_rows, dtype=np.float32)
            self._alive_host = np.ones(num_rows, dtype=bool)
            self._any_alive = None
            # One row (batch 1, the latency case): the decisions in Python floats, per step
            # lists of Python values; a numpy call on a one-element array costs a microsecond.
            self.one_row = num_rows == 1
            self._lam_one = float(self._lam[0]) if self.one_row else 0.0
            self._log_survival_one = 0.0
            self._alive_one = True
            return
        self.one_row = False
        device = lam.device
        self.state = DraftState.start(num_rows, lam=lam, device=device)
        self.alive = torch.ones(num_rows, dtype=torch.bool, device=device)
        # Whether any row was alive after step s, copied to the host: slot s % (lag + 1).
        async_device = device.type == "cuda"
        slots = alive_check_lag + 1
        self._any_alive = torch.ones(slots, dtype=torch.bool, pin_memory=async_device) if self.lag else None
        self._copied: list[Any] = [None] * slots
        self._async = async_device

    def record(
        self, logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor | None
    ) -> None:
        """One draft step: the logits [B, V] the draft computed, the tokens [B] it drafted, and
        the probabilities [B, V] it sampled them from (None: greedy drafting, argmax of logits)."""
        raise_if_injected("spec:stop_rule")
        step = self.steps
        if step >= self.k:
            raise RuntimeError(f"draft step {step + 1} recorded, but the cap K is {self.k}")
        if self.host:
            self._record_host(logits, token_ids, probs)
            return
        entropy = self.policy.rule.needs_entropy
        if probs is None:
            stats = draft_stats(logits, entropy=entropy)
        else:
            stats = draft_stats_from_probs(probs, token_ids, entropy=entropy)
        state = self.state
        decision = self.policy.rule(stats, state)
        alive = self.alive
        self.kept.append(alive & decision.keep)
        self.alive = alive & ~decision.stop
        if decision.state.log_survival is not state.log_survival:
            # Rows that stopped earlier keep their state: a later step is no longer theirs.
            self.state = DraftState(
                log_survival=torch.where(alive, decision.state.log_survival, state.log_survival),
                lam=state.lam,
            )
        top = self.policy.config.confidence == "top_prob"
        self.confidence.append(stats.top_prob if top else stats.token_prob)
        self.tokens.append(token_ids)
        if probs is not None:
            self.probs.append(probs)
        if self._any_alive is not None:
            slot = step % len(self._copied)
            self._any_alive[slot : slot + 1].copy_(self.alive.any().reshape(1), non_blocking=self._async)
            if self._async:
                event = torch.cuda.Event()
                event.record()
                self._copied[slot] = event

    def _record_host(
        self, logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor | None
    ) -> None:
        rule = self.policy.rule
        if self.one_row:
            one = host_row_stats(logits, token_ids, probs, rule.needs_entropy)
            if one is not None:
                self._record_one(rule, one, token_ids)
                if probs is not None:
                    self.probs.append(probs)
                return
            self._to_arrays()  # a row with no finite logit: the array path from here on
        stats = host_draft_stats(logits, None if probs is None else token_ids, rule.needs_entropy, probs)
        decision = rule.decide_host(stats, self._log_survival, self._lam)
        alive = self._alive_host
        self.kept.append(alive & decision.keep)
        self._alive_host = alive & ~decision.stop
        if decision.log_survival is not self._log_survival:
            # Rows that stopped earlier keep their state: a later step is no longer theirs.
            self._log_survival = np.where(alive, decision.log_survival, self._log_survival)
        top = self.policy.config.confidence == "top_prob"
        self.confidence.append(stats.top_prob if top else stats.token_prob)
        self.tokens.append(np.array(token_ids.numpy(), dtype=np.int64))  # a copy: ours to keep
        if probs is not None:
            self.probs.append(probs)

    def _record_one(self, rule: StopRule, stats: OneRowStats, token_ids: torch.Tensor) -> None:
        stop, keep, log_survival = rule.decide_one(stats, self._log_survival_one, self._lam_one)
        alive = self._alive_one
        self.kept.append(alive and keep)
        if alive:
            self._alive_one = not stop
            self._log_survival_one = log_survival
        self.confidence.append(stats.top_prob if self.policy.config.confidence == "top_prob"
                               else stats.token_prob)
        self.tokens.append(token_ids.item())

    def _to_arrays(self) -> None:
        """Leave the one-row path: its per-step values and state as the array path keeps them."""
        self.one_row = False
        self.tokens = [np.array([t], dtype=np.int64) for t in self.tokens]
        self.kept = [np.array([k], dtype=bool) for k in self.kept]
        self.confidence = [np.array([c], dtype=np.float32) for c in self.confidence]
        self._log_survival = np.array([self._log_survival_one], dtype=np.float32)
        self._alive_host = np.array([self._alive_one], dtype=bool)

    @property
    def steps(self) -> int:
        return len(self.tokens)

    @property
    def lam(self) -> np.ndarray:
        """Each row's AdaEDL lambda for this draft (float32, on the host; for tests)."""
        return self._lam if self.host else self.state.lam.cpu().numpy()

    def should_end(self) -> bool:
        """True when every row had stopped `lag` steps ago and steps remain: the loop can end.

        With lag 0 this reads the alive mask (a synchronisation on an asynchronous device);
        with lag L it waits only for step steps - L's flag, queued L steps earlier."""
        if self.steps >= self.k:
            return False
        if self.host:
            return not (self._alive_one if self.one_row else self._alive_host.any())
        if self._any_alive is None:
            return not bool(self.alive.any())
        checked = self.steps - 1 - self.lag
        if checked < 0:
            return False
        slot = checked % len(self._copied)
        event = self._copied[slot]
        if event is not None:
            event.synchronize()
        return not bool(self._any_alive[slot])

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, steps] tokens (int64), draft lengths [B] (int64: each row's prefix of kept steps)
        and confidences [B, steps] (float32), on the device; steps >= 1."""
        tokens = torch.stack(self.tokens, dim=1).to(torch.int64)
        kept = torch.stack(self.kept, dim=1).to(torch.int64)
        lengths = torch.cumprod(kept, dim=1).sum(dim=1)
        return tokens, lengths, torch.stack(self.confidence, dim=1).float()

    def host_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`stacked()` as numpy arrays on the host (one wait on an asynchronous device)."""
        if not self.host:
            tokens, lengths, confidence = to_host(*self.stacked())
            return tokens, lengths, confidence
        if self.one_row:
            kept = self.kept
            length = kept.index(False) if False in kept else len(kept)
            return (np.array([self.tokens], dtype=np.int64), np.array([length], dtype=np.int64),
                    np.array([self.confidence], dtype=np.float32))
        kept = np.stack(self.kept, axis=1)
        lengths = np.cumprod(kept, axis=1, dtype=np.int64).sum(axis=1)
        return np.stack(self.tokens, axis=1), lengths, np.stack(self.confidence, axis=1).astype(np.float32)

    def draft_probs(self) -> torch.Tensor | None:
        """[B, steps, V] probabilities of the steps run (probabilistic drafting), else None."""
        return torch.stack(self.probs, dim=1).contiguous() if self.probs else None


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Copies of `tensors` on the host as numpy arrays, with one wait on an asynchronous device
    (non-blocking copies into pinned memory, then one event)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.detach().cpu().numpy() for t in tensors]
    host = []
    for t in tensors:
        buffer = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buffer.copy_(t, non_blocking=True)
        host.append(buffer)
    event = torch.cuda.Event()
    event.record()
    event.synchronize()
    return [h.numpy() for h in host]


class DraftLengthPolicy:
    def __init__(
        self, config: AdaptiveDraftConfig, device: torch.device | str = "cpu",
        alive_check_lag: int | None = None, host_math: bool | None = None,
    ) -> None:
        """`host_math`: the per-step decisions in numpy (default: on a CPU device only)."""
        self.config = config
        self.device = torch.device(device)
        self.host_math = self.device.type == "cpu" if host_math is None else host_math
        if self.host_math and self.device.type != "cpu":
            raise ValueError(f"host_math needs a CPU device, got {self.device}")
        self.alive_check_lag = (default_alive_check_lag(self.device) if alive_check_lag is None
                                else alive_check_lag)
        injected_faults()  # a misspelt VLLM_ADAPTIVE_FAULT_INJECT stops the engine here
        # The calibrator's state is tiny and updated from host values: it lives on the host.
        self.calibrator = build_calibrator(config)
        self.rule: StopRule = build_stop_rule(config, self.calibrator)
        self.controller = GoodputController.from_config(config) if config.controller else None
        # SpecDec++ with specdec_threshold "auto": theta = 1 - the draft cost ratio, each step.
        self._auto_threshold = isinstance(self.rule, SpecDecStopRule) and config.specdec_threshold == AUTO
        self.cost_ratio = config.draft_cost_ratio or DEFAULT_DRAFT_COST_RATIO
        lam = self.rule.lam if isinstance(self.rule, AdaEDLStopRule) else 0.0
        self.rows = RowStates(config.max_draft_tokens, {
            "lam": lam, "acceptance_ema": config.adaedl_target_acceptance, "accepted": 0.0, "observed": 0.0})
        self.counters = DraftCounters(
            length_histogram=[0] * (config.max_draft_tokens + 1),
            cap_histogram=[0] * (config.max_draft_tokens + 1),
        )

    # --- per request -------------------------------------------------------------------------

    @property
    def requests(self) -> dict[str, RequestView]:
        """Each known request's values (lam, acceptance_ema, accepted, observed), by id."""
        return {r: RequestView(self.rows, r) for r in self.rows.known()}

    def token_acceptance(self, req_id: str, engine_rate: float | None = None) -> float:
        """The request's estimated acceptance of each draft token (the engine-wide rate until
        the request has its own)."""
        values = self.rows.get(req_id)
        if values is not None and values["observed"] > 0:
            return values["accepted"] / values["observed"]
        return self.engine_acceptance() if engine_rate is None else engine_rate

    def row_acceptance(self, rows: np.ndarray, engine_rate: float) -> np.ndarray:
        """`token_acceptance` of the requests at batch rows `rows` (a bool mask or indices)."""
        accepted, observed = self.rows.accepted[rows], self.rows.observed[rows]
        seen = observed > 0
        return np.where(seen, accepted / np.where(seen, observed, 1.0), engine_rate)

    def engine_acceptance(self) -> float:
        """Accepted / observed draft tokens over the calibrator's counts (0.5 before any)."""
        total = float(self.calibrator.observed.sum())
        if total > 0:
            return float(self.calibrator.accepted.sum()) / total
        return 0.5

    # --- one engine step ---------------------------------------------------------------------

    def observe_verification(
        self,
        req_ids: Sequence[str],
        scheduled: Sequence[Sequence[int]],
        num_accepted: Sequence[int] | np.ndarray,
    ) -> None:
        """The target verified `scheduled[r]` (the draft tokens the scheduler kept for row r) and
        accepted `num_accepted[r]` of them. Rows whose draft is not the one this policy proposed
        (placeholders of resumed requests, a step the drafter did not run) are skipped."""
        rows = self.rows
        rows.align(req_ids)
        num_rows = len(req_ids)
        if num_rows == 1 and self.host_math:
            self._observe_one(scheduled[0], int(num_accepted[0]))
            return
        # Taken before anything can fail: a step whose feedback failed learns nothing, and
        # the next step never matches its verification against these drafts.
        pending_len = rows.pending_len.copy()
        rows.pending_len.fill(-1)
        raise_if_injected("spec:feedback")
        drafted = np.fromiter((len(t) for t in scheduled), dtype=np.int64, count=num_rows)
        candidates = np.flatnonzero((drafted > 0) & (pending_len >= drafted)).tolist()
        if not candidates:
            return
        tokens = rows.pending_tokens
        matched = np.array(
            [r for r in candidates if tokens[r][: drafted[r]] == list(scheduled[r])], dtype=np.int64)
        if len(matched) == 0:
            return
        drafted = drafted[matched]
        accepted = np.minimum(np.maximum(np.asarray(num_accepted, dtype=np.int64)[matched], 0), drafted)
        width = int(drafted.max())
        confidence = rows.pending_conf[matched, :width].copy()
        confidence[np.arange(width)[None, :] >= drafted[:, None]] = 0.0
        if self.host_math:
            self.calibrator.update_from_verification_host(confidence, drafted, accepted)
            if isinstance(self.rule, AdaEDLStopRule):
                lam, ema = self.rule.update_lambda_host(
                    rows.lam[matched].astype(np.float32), rows.acceptance_ema[matched].astype(np.float32),
                    drafted, accepted, self.config.max_draft_tokens)
                rows.lam[matched] = lam
                rows.acceptance_ema[matched] = ema
            self._count_verification(rows, matched, drafted, accepted)
            return
        drafted_t = torch.from_numpy(drafted)
        accepted_t = torch.from_numpy(accepted)
        self.calibrator.update_from_verification(torch.from_numpy(confidence), drafted_t, accepted_t)

        if isinstance(self.rule, AdaEDLStopRule):
            lam, ema = self.rule.update_lambda(
                torch.from_numpy(rows.lam[matched].astype(np.float32)),
                torch.from_numpy(rows.acceptance_ema[matched].astype(np.float32)),
                drafted_t,
                accepted_t,
                self.config.max_draft_tokens,
            )
            rows.lam[matched] = lam.numpy()
            rows.acceptance_ema[matched] = ema.numpy()
        self._count_verification(rows, matched, drafted, accepted)

    def _observe_one(self, scheduled: Sequence[int], num_accepted: int) -> None:
        """`observe_verification` of a batch of one on the host, in Python values (the same
        state as the array path: test_spec_policy_host_math.py)."""
        rows = self.rows
        pending_len = int(rows.pending_len[0])
        rows.pending_len[0] = -1
        raise_if_injected("spec:feedback")
        drafted = len(scheduled)
        if not 0 < drafted <= pending_len or rows.pending_tokens[0][:drafted] != list(scheduled):
            return
        accepted = min(max(num_accepted, 0), drafted)
        self.calibrator.update_one(rows.pending_conf[0, :drafted].tolist(), accepted)
        if isinstance(self.rule, AdaEDLStopRule):
            lam, ema = self.rule.update_lambda_one(
                f32(rows.lam[0]), f32(rows.acceptance_ema[0]), drafted, accepted,
                self.config.max_draft_tokens)
            rows.lam[0] = lam
            rows.acceptance_ema[0] = ema
        rows.accepted[0] = rows.accepted[0] * ACCEPTANCE_DECAY + accepted
        rows.observed[0] = rows.observed[0] * ACCEPTANCE_DECAY + min(accepted + 1, drafted)
        counters = self.counters
        counters.verified_drafts += 1
        counters.verified_tokens += drafted
        counters.accepted_tokens += accepted

    def _count_verification(
        self, rows: RowStates, matched: np.ndarray, drafted: np.ndarray, accepted: np.ndarray
    ) -> None:
        # Verification tests a prefix: the tokens accepted and the first rejected one.
        rows.accepted[matched] = rows.accepted[matched] * ACCEPTANCE_DECAY + accepted
        rows.observed[matched] = rows.observed[matched] * ACCEPTANCE_DECAY + np.minimum(accepted + 1, drafted)
        self.counters.verified_drafts += len(matched)
        self.counters.verified_tokens += int(drafted.sum())
        self.counters.accepted_tokens += int(accepted.sum())

    def begin(
        self, req_ids: Sequence[str], decoding: Sequence[bool] | np.ndarray, k_max: int
    ) -> DraftInProgress:
        """Start this step's drafts for rows `req_ids`; `decoding[r]` is False for rows whose
        draft the scheduler will drop (prompt chunks). K is the controller's cap, at most k_max."""
        self.rows.align(req_ids)
        decoding = np.asarray(decoding, dtype=bool)
        k = min(k_max, self.config.max_draft_tokens)
        if self.controller is not None:
            raise_if_injected("spec:controller")
            rates = self.row_acceptance(decoding, self.engine_acceptance())
            k = min(k, self.controller.decide_rates(rates))
        if self._auto_threshold:
            self._update_threshold(int(decoding.sum()))
        self.counters.proposals += 1
        self.counters.cap_histogram[k] += 1
        if self.host_math:
            return DraftInProgress(self, len(req_ids), k, self.rows.lam.astype(np.float32))
        lam = torch.from_numpy(self.rows.lam.astype(np.float32))
        return DraftInProgress(self, len(req_ids), k, host_to_device(lam, self.device), self.alive_check_lag)

    def _update_threshold(self, num_rows: int) -> None:
        if self.config.draft_cost_ratio is None and self.controller is not None:
            measured = self.controller.draft_cost_ratio(num_rows)
            if measured is not None:
                self.cost_ratio = measured
        threshold = threshold_for_cost_ratio(self.cost_ratio)
        if threshold != self.rule.threshold:  # type: ignore[union-attr]
            self.rule = dataclasses.replace(self.rule, threshold=threshold)  # type: ignore[type-var]

    def finish(
        self, draft: DraftInProgress, req_ids: Sequence[str], decoding: Sequence[bool] | np.ndarray
    ) -> list[list[int]]:
        """Each row's draft: the tokens its stop rule kept (a prefix of the steps run)."""
        raise_if_injected("spec:finish")
        steps = draft.steps
        if draft.one_row and steps > 0:
            return [self._finish_one(draft, bool(decoding[0]))]
        decoding = np.asarray(decoding, dtype=bool)
        if steps == 0:
            drafts: list[list[int]] = [[] for _ in req_ids]
            lengths = np.zeros(len(req_ids), dtype=np.int64)
        else:
            tokens, lengths, confidence = draft.host_arrays()
            drafts = [row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())]
            rows = self.rows
            if decoding.all():
                rows.pending_tokens = drafts
            else:
                rows.pending_tokens = [d if dec else old for d, old, dec
                                       in zip(drafts, rows.pending_tokens, decoding.tolist())]
            rows.pending_conf[decoding, :steps] = confidence[decoding]
        self.rows.pending_len[decoding] = lengths[decoding]
        counters = self.counters
        counters.draft_passes += max(steps, 1)
        if steps < draft.k:
            counters.early_exits += 1
        decoded = lengths[decoding]
        counters.draft_rows += len(decoded)
        counters.draft_tokens += int(decoded.sum())
        histogram = np.bincount(decoded, minlength=len(counters.length_histogram))
        counters.length_histogram = [a + int(b) for a, b in zip(counters.length_histogram, histogram)]
        stopped = int((decoded < draft.k).sum())
        counters.rule_stops += stopped
        counters.cap_reached += len(decoded) - stopped
        return drafts

    def _finish_one(self, draft: DraftInProgress, decoding: bool) -> list[int]:
        """`finish` of a batch of one whose draft ran on the one-row path (the same state)."""
        steps, kept = draft.steps, draft.kept
        length = kept.index(False) if False in kept else steps
        tokens = draft.tokens[:length]
        rows, counters = self.rows, self.counters
        counters.draft_passes += steps
        if steps < draft.k:
            counters.early_exits += 1
        if decoding:
            rows.pending_tokens = [tokens]
            rows.pending_conf[0, :steps] = draft.confidence
            rows.pending_len[0] = length
            counters.draft_rows += 1
            counters.draft_tokens += length
            counters.length_histogram[length] += 1
            if length < draft.k:
                counters.rule_stops += 1
            else:
                counters.cap_reached += 1
        return tokens

    def observe_step(
        self, num_rows: int, num_tokens: int, verify_seconds: float | None,
        num_passes: int, draft_seconds: float,
    ) -> None:
        """Timings for the controller: the target step that verified `num_tokens` for
        `num_rows` rows (None when unknown), and this step's drafting."""
        if self.controller is None or num_rows == 0:
            return
        if verify_seconds is not None and math.isfinite(verify_seconds) and verify_seconds >= 0:
            model = self.controller.verify_time
            limit = IDLE_SECONDS
            if model.num_observations >= self.controller.min_samples:
                limit = IDLE_FACTOR * max(model.predict((num_rows, num_tokens)), 1e-3)
            if verify_seconds <= limit:
                self.controller.observe_verify(num_rows, num_tokens, verify_seconds)
        self.controller.observe_draft(num_rows, num_passes, draft_seconds)

    def record_failure(self, stage: str) -> None:
        """Count a failure the proposer caught at `stage` (one of FAILURE_STAGES)."""
        self.counters.failures += 1
        stages = self.counters.failure_stages
        stages[stage] = stages.get(stage, 0) + 1

    def metrics_snapshot(self) -> dict:
        """What the worker publishes for `/metrics` (vllm_adaptive.worker_metrics): plain data."""
        return {
            "stop_rule": self.rule.name,
            "max_draft_tokens": self.config.max_draft_tokens,
            "counters": dataclasses.asdict(self.counters),
            "controller_k": None if self.controller is None else self.controller.k,
            "specdec_threshold": getattr(self.rule, "threshold", None),
        }

    def snapshot(self) -> dict:
        """Counters and state for introspection (plain data)."""
        counters = dataclasses.asdict(self.counters)
        rows = max(self.counters.draft_rows, 1)
        verified = max(self.counters.verified_tokens, 1)
        return {
            "config": dataclasses.asdict(self.config),
            "stop_rule": self.rule.name,
            "counters": counters,
            "mean_draft_length": self.counters.draft_tokens / rows,
            "acceptance_rate": self.counters.accepted_tokens / verified,
            "controller_k": None if self.controller is None else self.controller.k,
            "specdec_threshold": getattr(self.rule, "threshold", None),
            "draft_cost_ratio": self.cost_ratio,
            "calibration": self.calibrator.estimates().tolist(),
            "lambdas": {r: self.rows.get(r)["lam"] for r in self.rows.known()},  # type: ignore[index]
        }
