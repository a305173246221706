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
`finish` (the drafts), `observe_step` (timings). Tensors stay on the draft model's device
until `finish`, which reads them once.

Each stage has a fault point (`vllm_adaptive.faults`, off unless VLLM_ADAPTIVE_FAULT_INJECT
names it): `spec:feedback`, `spec:controller`, `spec:stop_rule`, `spec:finish`, so that tests can
prove that the proposer's fallback for each stage serves the step in a real engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from vllm_adaptive.faults import injected_faults, raise_if_injected
from vllm_adaptive.speculative.config import AUTO, DEFAULT_DRAFT_COST_RATIO, AdaptiveDraftConfig
from vllm_adaptive.speculative.controller import GoodputController
from vllm_adaptive.speculative.stop_rules import (
    AdaEDLStopRule,
    DraftState,
    SpecDecStopRule,
    StopRule,
    build_calibrator,
    build_stop_rule,
    draft_stats,
    draft_stats_from_probs,
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


@dataclasses.dataclass
class RequestDraftState:
    """What the policy remembers about one request between steps."""

    lam: float  # AdaEDL threshold lambda
    acceptance_ema: float  # AdaEDL's AR: EMA of accepted / drafted
    accepted: float = 0.0  # decayed count of accepted draft tokens
    observed: float = 0.0  # decayed count of draft tokens verification tested (censoring aside)


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


class DraftInProgress:
    """The draft steps of one propose call: per step tokens, kept rows and confidences."""

    def __init__(self, policy: DraftLengthPolicy, num_rows: int, k: int, lam: torch.Tensor) -> None:
        self.policy = policy
        self.k = k
        self.num_rows = num_rows
        device = lam.device
        self.state = DraftState.start(num_rows, lam=lam, device=device)
        self.alive = torch.ones(num_rows, dtype=torch.bool, device=device)
        self.tokens: list[torch.Tensor] = []
        self.kept: list[torch.Tensor] = []
        self.confidence: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.failed = False

    @property
    def steps(self) -> int:
        return len(self.tokens)

    def record(
        self, logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor | None
    ) -> None:
        """One draft step: the logits [B, V] the draft computed, the tokens [B] it drafted, and
        the probabilities [B, V] it sampled them from (None: greedy drafting, argmax of logits)."""
        raise_if_injected("spec:stop_rule")
        entropy = self.policy.rule.needs_entropy
        if probs is None:
            stats = draft_stats(logits, entropy=entropy)
        else:
            stats = draft_stats_from_probs(probs, token_ids, entropy=entropy)
        decision = self.policy.rule(stats, self.state)
        alive = self.alive
        self.kept.append(alive & decision.keep)
        self.alive = alive & ~decision.stop
        # Rows that stopped earlier keep their state: a later step is no longer theirs.
        self.state = DraftState(
            log_survival=torch.where(alive, decision.state.log_survival, self.state.log_survival),
            lam=self.state.lam,
        )
        top = self.policy.config.confidence == "top_prob"
        self.confidence.append(stats.top_prob if top else stats.token_prob)
        self.tokens.append(token_ids)
        if probs is not None:
            self.probs.append(probs)

    def should_end(self) -> bool:
        """True when every row has stopped and steps remain: the loop can end now.

        Reads one bool from the device (a synchronisation on GPU), only when steps remain."""
        return self.steps < self.k and not bool(self.alive.any())

    def draft_probs(self) -> torch.Tensor | None:
        """[B, steps, V] probabilities of the steps run (probabilistic drafting), else None."""
        return torch.stack(self.probs, dim=1).contiguous() if self.probs else None


class DraftLengthPolicy:
    def __init__(self, config: AdaptiveDraftConfig, device: torch.device | str = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        injected_faults()  # a misspelt VLLM_ADAPTIVE_FAULT_INJECT stops the engine here
        # The calibrator's state is tiny and updated from host values: it lives on the host.
        self.calibrator = build_calibrator(config)
        self.rule: StopRule = build_stop_rule(config, self.calibrator)
        self.controller = GoodputController.from_config(config) if config.controller else None
        # SpecDec++ with specdec_threshold "auto": theta = 1 - the draft cost ratio, each step.
        self._auto_threshold = isinstance(self.rule, SpecDecStopRule) and config.specdec_threshold == AUTO
        self.cost_ratio = config.draft_cost_ratio or DEFAULT_DRAFT_COST_RATIO
        self.requests: dict[str, RequestDraftState] = {}
        # req_id -> (draft tokens, their confidences) awaiting verification.
        self._pending: dict[str, tuple[list[int], list[float]]] = {}
        self.counters = DraftCounters(
            length_histogram=[0] * (config.max_draft_tokens + 1),
            cap_histogram=[0] * (config.max_draft_tokens + 1),
        )

    # --- per request -------------------------------------------------------------------------

    def _request(self, req_id: str) -> RequestDraftState:
        state = self.requests.get(req_id)
        if state is None:
            lam = self.rule.lam if isinstance(self.rule, AdaEDLStopRule) else 0.0
            target = self.config.adaedl_target_acceptance
            state = self.requests[req_id] = RequestDraftState(lam=lam, acceptance_ema=target)
        return state

    def _forget_requests_not_in(self, req_ids: Sequence[str]) -> None:
        # A request that left the batch (finished, or preempted) starts afresh if it comes back.
        if len(self.requests) > 4 * max(len(req_ids), 64):
            current = set(req_ids)
            self.requests = {r: s for r, s in self.requests.items() if r in current}

    def token_acceptance(self, req_id: str, engine_rate: float | None = None) -> float:
        """The request's estimated acceptance of each draft token (the engine-wide rate until
        the request has its own; pass `engine_rate` when asking for many requests)."""
        state = self.requests.get(req_id)
        if state is not None and state.observed > 0:
            return state.accepted / state.observed
        return self.engine_acceptance() if engine_rate is None else engine_rate

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
        num_accepted: Sequence[int],
    ) -> None:
        """The target verified `scheduled[r]` (the draft tokens the scheduler kept for row r) and
        accepted `num_accepted[r]` of them. Rows whose draft is not the one this policy proposed
        (placeholders of resumed requests, a step the drafter did not run) are skipped."""
        # Taken before anything can fail: a step whose feedback failed learns nothing, and
        # the next step never matches its verification against these drafts.
        pending_drafts, self._pending = self._pending, {}
        raise_if_injected("spec:feedback")
        rows: list[tuple[str, int, int, list[float]]] = []
        for req_id, tokens, accepted in zip(req_ids, scheduled, num_accepted):
            pending = pending_drafts.get(req_id)
            drafted = len(tokens)
            if drafted == 0 or pending is None or list(pending[0][:drafted]) != list(tokens):
                continue
            accepted = min(max(int(accepted), 0), drafted)
            rows.append((req_id, drafted, accepted, pending[1][:drafted]))
        if not rows:
            return
        width = max(drafted for _, drafted, _, _ in rows)
        confidence = torch.tensor([list(conf) + [0.0] * (width - drafted) for _, drafted, _, conf in rows],
                                  dtype=torch.float32)
        drafted_t = torch.tensor([d for _, d, _, _ in rows])
        accepted_t = torch.tensor([a for _, _, a, _ in rows])
        self.calibrator.update_from_verification(confidence, drafted_t, accepted_t)

        states = [self._request(req_id) for req_id, _, _, _ in rows]
        if isinstance(self.rule, AdaEDLStopRule):
            lam, ema = self.rule.update_lambda(
                torch.tensor([s.lam for s in states], dtype=torch.float32),
                torch.tensor([s.acceptance_ema for s in states], dtype=torch.float32),
                drafted_t,
                accepted_t,
                self.config.max_draft_tokens,
            )
            for state, lam_r, ema_r in zip(states, lam.tolist(), ema.tolist()):
                state.lam, state.acceptance_ema = lam_r, ema_r
        for state, (_, drafted, accepted, _) in zip(states, rows):
            # Verification tests a prefix: the tokens accepted and the first rejected one.
            state.accepted = state.accepted * ACCEPTANCE_DECAY + accepted
            state.observed = state.observed * ACCEPTANCE_DECAY + min(accepted + 1, drafted)
            self.counters.verified_drafts += 1
            self.counters.verified_tokens += drafted
            self.counters.accepted_tokens += accepted

    def begin(
        self, req_ids: Sequence[str], decoding: Sequence[bool], k_max: int
    ) -> DraftInProgress:
        """Start this step's drafts for rows `req_ids`; `decoding[r]` is False for rows whose
        draft the scheduler will drop (prompt chunks). K is the controller's cap, at most k_max."""
        self._forget_requests_not_in(req_ids)
        k = min(k_max, self.config.max_draft_tokens)
        if self.controller is not None:
            raise_if_injected("spec:controller")
            decoding_ids = [r for r, d in zip(req_ids, decoding) if d]
            width = self.controller.max_draft_tokens
            engine_rate = self.engine_acceptance()
            acceptance = torch.tensor(
                [[self.token_acceptance(r, engine_rate)] * width for r in decoding_ids], dtype=torch.float64
            ).reshape(len(decoding_ids), width)
            k = min(k, self.controller.decide(acceptance))
        if self._auto_threshold:
            self._update_threshold(sum(1 for d in decoding if d))
        lam = torch.tensor([self._request(r).lam for r in req_ids], dtype=torch.float32)
        self.counters.proposals += 1
        self.counters.cap_histogram[k] += 1
        return DraftInProgress(self, len(req_ids), k, lam.to(self.device))

    def _update_threshold(self, num_rows: int) -> None:
        if self.config.draft_cost_ratio is None and self.controller is not None:
            measured = self.controller.draft_cost_ratio(num_rows)
            if measured is not None:
                self.cost_ratio = measured
        threshold = threshold_for_cost_ratio(self.cost_ratio)
        if threshold != self.rule.threshold:  # type: ignore[union-attr]
            self.rule = dataclasses.replace(self.rule, threshold=threshold)  # type: ignore[type-var]

    def finish(
        self, draft: DraftInProgress, req_ids: Sequence[str], decoding: Sequence[bool]
    ) -> list[list[int]]:
        """Each row's draft: the tokens its stop rule kept (a prefix of the steps run)."""
        raise_if_injected("spec:finish")
        if draft.steps == 0:
            drafts: list[list[int]] = [[] for _ in req_ids]
            confidences: list[list[float]] = [[] for _ in req_ids]
        else:
            kept = torch.stack(draft.kept, dim=1).cpu()
            lengths = torch.cumprod(kept.to(torch.int64), dim=1).sum(dim=1).tolist()
            tokens = torch.stack(draft.tokens, dim=1).cpu().tolist()
            conf = torch.stack(draft.confidence, dim=1).float().cpu().tolist()
            drafts = [row[:n] for row, n in zip(tokens, lengths)]
            confidences = [row[:n] for row, n in zip(conf, lengths)]
        counters = self.counters
        counters.draft_passes += max(draft.steps, 1)
        if draft.steps < draft.k:
            counters.early_exits += 1
        for req_id, tokens_r, conf_r, decoding_r in zip(req_ids, drafts, confidences, decoding):
            if not decoding_r:
                continue
            self._pending[req_id] = (tokens_r, conf_r)
            counters.draft_rows += 1
            counters.draft_tokens += len(tokens_r)
            counters.length_histogram[len(tokens_r)] += 1
            if len(tokens_r) < draft.k:
                counters.rule_stops += 1
            else:
                counters.cap_reached += 1
        return drafts

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
            "lambdas": {r: s.lam for r, s in self.requests.items()},
        }
