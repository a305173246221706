"""vLLM's draft-model proposer with per-request adaptive draft length (issue #5).

The V1 model runner builds `DraftModelProposer` for `method: "draft_model"`; the patch
`gpu_model_runner_draft_model_proposer` makes it build this subclass instead. On an engine
without the plugin's config, or with `speculative.enabled: false`, every override delegates
to vLLM at once: the proposer is vLLM's, call for call.

With adaptive drafting on, each `propose`:

1. reads how many of the previous step's draft tokens the target accepted (the runner's
   scheduled draft counts and `num_rejected_tokens_gpu`) and feeds them to the policy
   (calibrator, AdaEDL lambda, per-request acceptance);
2. asks the policy for the cap K (the goodput controller, when on) and runs vLLM's own draft
   loop with it; every draft step goes through `_sample_draft_tokens`, where the policy's stop
   rule decides, row by row, whether the draft goes on. When every row has stopped, the loop
   ends early: `_sample_draft_tokens` raises `_DraftsEnded`, which `propose` catches. vLLM
   calls `_sample_draft_tokens` only after its forward context has closed, and the loop has
   nothing left to do but stack what was drafted, so ending it there leaves the proposer as if
   it had been asked for fewer tokens;
3. returns each row's draft as a list of its own length, which the runner passes to the
   scheduler unchanged; rows that stopped at once draft nothing (a plain decode step).

Verification is vLLM's rejection sampler, unchanged, so greedy output is the target's.

Nothing of the policy raises into the engine. An error at one of its stages (policy.FAILURE_STAGES)
is counted under that stage (`failures`, `failure_stages`; `vllm_adaptive:spec_failures_total`
on a server), logged the first time per stage, and degrades that step only:

- `feedback` (learning from the previous drafts' verification) or `controller` (choosing K):
  the step drafts as vLLM does, `num_speculative_tokens` for every row;
- `stop_rule` (a draft step): the rest of the loop is vLLM's, and the step's drafts are its
  fixed-K ones;
- `finish` (collecting the drafts and timings): vLLM's fixed-K drafts when the loop ran to K;
  when it ended early, no drafts (a plain decode step), since there are no fixed-K ones.

Each keeps verification as it is, so greedy output stays the target's. Tests force each stage to
fail through `vllm_adaptive.faults` (tests/engine/test_speculative_faults.py).

Host-device traffic per step (issue #17): the previous step's rejection counts come to the host
in one non-blocking copy; the draft loop reads no device value per draft step (the policy's
alive check is lagged on a GPU); the drafts come back in one copy in `finish`. On a GPU the
controller's step times come from CUDA events (`StepTimer`), read once they have completed
(a step or more later), instead of a `torch.cuda.synchronize` per step; on CPU, where the
engine runs synchronously, from the host clock.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from vllm_adaptive.config import AdaptiveConfig
from vllm_adaptive.routing import gate as routing_gate
from vllm_adaptive.routing.policy import RoutedDraft, RoutingPolicy, emitted_rows
from vllm_adaptive.speculative.compatibility import check_vllm_config
from vllm_adaptive.speculative.policy import DraftInProgress, DraftLengthPolicy
from vllm_adaptive.worker_metrics import ROUTING, SPECULATIVE, SnapshotPublisher

logger = logging.getLogger(__name__)


class _DraftsEnded(Exception):
    """Raised inside vLLM's draft loop when every row's draft has stopped."""


class StepTimer:
    """Step times for the controller, from CUDA events on a GPU (no synchronisation).

    `start()` when propose begins (the target's step is queued before it), `end(...)` when it
    returns; each ended step is kept until its end event has completed (`event.query()`), then
    reported as verify seconds (GPU time from the previous step's end to this step's start: the
    target's forward and sampling, None for the first) and draft seconds (start to end). Steps
    are reported in order; at most `max_pending` wait (older ones are dropped, unreported).
    `event_factory` makes the events (tests pass a stand-in for torch.cuda.Event).
    """

    def __init__(
        self, report: Callable[[int, int, float | None, int, float], None],
        event_factory: Callable[[], Any] | None = None, max_pending: int = 64,
    ) -> None:
        self.report = report
        self.event_factory = event_factory or (lambda: torch.cuda.Event(enable_timing=True))
        self.max_pending = max_pending
        self._pending: collections.deque = collections.deque()
        self._last_end: Any = None
        self._start: Any = None

    def start(self) -> None:
        self._start = self.event_factory()
        self._start.record()

    def end(self, num_rows: int, num_tokens: int, num_passes: int) -> None:
        if self._start is None:
            return
        end = self.event_factory()
        end.record()
        self._pending.append((num_rows, num_tokens, num_passes, self._last_end, self._start, end))
        self._last_end, self._start = end, None
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
        self.collect()

    def collect(self) -> None:
        """Report every step whose events have completed, oldest first."""
        while self._pending and self._pending[0][5].query():
            num_rows, num_tokens, passes, previous, start, end = self._pending.popleft()
            verify = None if previous is None else previous.elapsed_time(start) / 1000.0
            self.report(num_rows, num_tokens, verify, passes, start.elapsed_time(end) / 1000.0)


class AdaptiveDraftModelProposer(DraftModelProposer):
    def __init__(self, vllm_config: Any, device: torch.device, runner: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self._runner = runner  # vLLM's base class accepts it and drops it
        self._draft: DraftInProgress | None = None
        self._last_step_end: float | None = None
        self._failures_logged: set[str] = set()
        self.policy: DraftLengthPolicy | None = None
        self._publisher: SnapshotPublisher | None = None
        self._timer: StepTimer | None = None
        self._rejected_host: torch.Tensor | None = None
        self.routing: RoutingPolicy | None = None
        self._routed: RoutedDraft | None = None
        self._gate: routing_gate.RoutingGate | None = None
        self._gate_seen = (0, 0)  # (mismatched rows, failures) already added to the counters
        adaptive = AdaptiveConfig.from_vllm_config(vllm_config)
        if adaptive is not None and adaptive.routing.enabled:
            self._start_routing(adaptive, vllm_config, device, runner)
        if adaptive is not None and adaptive.speculative.enabled:
            check_vllm_config(adaptive.speculative, vllm_config)
            if runner is None:
                raise RuntimeError("adaptive drafting needs the model runner; vLLM passed none")
            self.policy = DraftLengthPolicy(adaptive.speculative, device=device)
            if self.device.type == "cuda" and self.policy.controller is not None:
                self._timer = StepTimer(self.policy.observe_step)
            # Under `vllm serve --plugin adaptive`: the counters on the API server's /metrics.
            self._publisher = SnapshotPublisher.from_environment(SPECULATIVE, self.policy.metrics_snapshot)
            logger.info(
                "vllm-adaptive: adaptive draft length on (stop rule %s, up to %d tokens, "
                "controller %s)", adaptive.speculative.stop_rule,
                adaptive.speculative.max_draft_tokens,
                "on" if adaptive.speculative.controller else "off",
            )

    # --- vLLM's entry points -----------------------------------------------------------------

    def propose(
        self,
        num_speculative_tokens,
        target_token_ids: torch.Tensor,
        target_positions: torch.Tensor,
        target_hidden_states: torch.Tensor,
        next_token_ids: torch.Tensor,
        token_indices_to_sample: torch.Tensor | None,
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu: torch.Tensor | None = None,
        slot_mappings=None,
    ) -> torch.Tensor | list[list[int]]:
        arguments = dict(
            target_token_ids=target_token_ids,
            target_positions=target_positions,
            target_hidden_states=target_hidden_states,
            next_token_ids=next_token_ids,
            token_indices_to_sample=token_indices_to_sample,
            common_attn_metadata=common_attn_metadata,
            sampling_metadata=sampling_metadata,
            mm_embed_inputs=mm_embed_inputs,
            num_rejected_tokens_gpu=num_rejected_tokens_gpu,
            slot_mappings=slot_mappings,
        )
        if self.routing is not None:
            try:
                return self._propose_routed(self.routing, num_speculative_tokens, next_token_ids, arguments)
            finally:
                if self._publisher is not None:
                    self._publisher.touch()
        policy = self.policy
        if policy is None:
            return super().propose(num_speculative_tokens=num_speculative_tokens, **arguments)
        try:
            return self._propose_adaptive(policy, num_speculative_tokens, next_token_ids,
                                          common_attn_metadata, num_rejected_tokens_gpu, arguments)
        finally:
            if self._publisher is not None:
                self._publisher.touch()  # written from the publisher's thread, not this one

    def _propose_adaptive(
        self,
        policy: DraftLengthPolicy,
        num_speculative_tokens: int,
        next_token_ids: torch.Tensor,
        common_attn_metadata: Any,
        num_rejected_tokens_gpu: torch.Tensor | None,
        arguments: dict[str, Any],
    ) -> torch.Tensor | list[list[int]]:
        started = time.perf_counter()
        timer = self._timer
        if timer is not None:
            timer.start()
        num_rows = next_token_ids.shape[0]
        stage = "feedback"
        try:
            num_tokens = int(common_attn_metadata.num_actual_tokens)  # the target step's tokens
            req_ids = list(self._runner.input_batch.req_ids[:num_rows])
            decoding = self._runner.discard_request_mask.np[:num_rows] == 0
            self._observe_verification(req_ids, num_rows, num_rejected_tokens_gpu)
            stage = "controller"
            draft = policy.begin(req_ids, decoding, num_speculative_tokens)
        except Exception:
            self._failed(stage)
            return super().propose(num_speculative_tokens=num_speculative_tokens, **arguments)

        self._draft = draft
        upstream = None
        try:
            upstream = super().propose(num_speculative_tokens=draft.k, **arguments)
        except _DraftsEnded:
            pass
        finally:
            self._draft = None
        if draft.failed:
            return upstream  # the step's drafts are vLLM's fixed-K ones

        try:
            drafts = policy.finish(draft, req_ids, decoding)
            self._last_draft_probs = draft.draft_probs()
            passes = max(draft.steps, 1)  # K = 0 still runs the first pass
            if timer is not None:
                timer.end(num_rows, num_tokens, passes)
            else:
                ended = time.perf_counter()
                verify_seconds = None if self._last_step_end is None else started - self._last_step_end
                policy.observe_step(num_rows, num_tokens, verify_seconds, passes, ended - started)
                self._last_step_end = ended
        except Exception:
            self._failed("finish")
            if upstream is not None:
                return upstream  # vLLM's fixed-K drafts, with the probabilities it kept
            # The loop ended early: vLLM kept no draft probabilities, and a draft verified
            # without them would not be lossless under sampling. No drafts this step.
            self._last_draft_probs = None
            return [[] for _ in range(num_rows)]
        return drafts

    def _sample_draft_tokens(
        self, hidden_states: torch.Tensor, sampling_metadata: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._routed is not None:
            return self._sample_routed(self._routed, hidden_states, sampling_metadata)
        draft = self._draft
        if draft is None or draft.failed:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        # As vLLM's greedy path (argmax of compute_logits) or its probabilistic one.
        logits = self.model.compute_logits(hidden_states)
        token_ids, probs = self._sample_from_logits(logits, sampling_metadata)
        try:
            draft.record(logits, token_ids, probs)
            end = draft.should_end()
        except Exception:
            draft.failed = True
            self._failed("stop_rule")
            return token_ids, probs
        if end:
            raise _DraftsEnded
        return token_ids, probs

    # --- EAD routing (vllm_adaptive.routing) ------------------------------------------------------

    def _start_routing(self, adaptive: AdaptiveConfig, vllm_config: Any, device: torch.device,
                       runner: Any) -> None:
        from vllm_adaptive.routing.compatibility import check_vllm_config as check_routing

        check_routing(adaptive.routing, vllm_config)
        if runner is None:
            raise RuntimeError("EAD routing needs the model runner; vLLM passed none")
        k = int(vllm_config.speculative_config.num_speculative_tokens)
        self.routing = RoutingPolicy(adaptive.routing, k, device=device)
        self._gate = routing_gate.RoutingGate(runner)
        routing_gate.install(self._gate)
        self._publisher = SnapshotPublisher.from_environment(ROUTING, self.routing_snapshot)
        logger.info("vllm-adaptive: EAD routing on (default mode %s, tau %.3g bits, window %d, "
                    "min stint %d, K %d)", adaptive.routing.mode, adaptive.routing.tau,
                    adaptive.routing.window, adaptive.routing.min_stint, k)

    def _propose_routed(
        self, routing: RoutingPolicy, num_speculative_tokens: int, next_token_ids: torch.Tensor,
        arguments: dict[str, Any],
    ) -> torch.Tensor | list[list[int]]:
        runner = self._runner
        num_rows = next_token_ids.shape[0]
        req_ids = list(runner.input_batch.req_ids[:num_rows])
        discard = runner.discard_request_mask.np[:num_rows] != 0
        states = [runner.requests.get(r) for r in req_ids]
        try:
            routings = [routing.routing_of(r, functools.partial(self._parse_routing, s))
                        for r, s in zip(req_ids, states)]
        except Exception:
            self._routing_failed("begin")
            routing.pending = None  # never commit a plan from steps ago
            if self._gate is not None:
                self._gate.take_receipt()
            return super().propose(num_speculative_tokens=num_speculative_tokens, **arguments)
        try:
            self._commit_routed(routing, req_ids, routings, states, discard)
        except Exception:
            self._routing_failed("commit")
        try:
            if len(routing.routings) > 2 * max(len(req_ids), 64):
                requests = self._runner.requests
                routing.forget(lambda r: r in requests)
        except Exception:
            self._routing_failed("commit")
        try:
            draft = routing.begin(req_ids, routings, ~discard)
        except Exception:
            self._routing_failed("begin")
            return super().propose(num_speculative_tokens=num_speculative_tokens, **arguments)
        if draft is None:  # no EAD row decodes: vLLM's own step
            return super().propose(num_speculative_tokens=num_speculative_tokens, **arguments)
        self._routed = draft
        upstream = None
        try:
            upstream = super().propose(num_speculative_tokens=num_speculative_tokens, **arguments)
        except _DraftsEnded:
            pass
        finally:
            self._routed = None
        if draft.failed:
            routing.counters.draft_passes += routing.k  # vLLM's loop drafted on to K
            return upstream  # vLLM's drafts, verified losslessly (no plan)
        try:
            drafts, plan = routing.finish(draft)
            self._last_draft_probs = draft.draft_probs()
        except Exception:
            routing.counters.draft_passes += max(draft.steps, 1)
            self._routing_failed("finish")
            if upstream is not None:
                return upstream
            self._last_draft_probs = None
            return [[] for _ in range(num_rows)]
        assert self._gate is not None
        self._gate.arm(plan)
        return drafts

    def _commit_routed(self, routing: RoutingPolicy, req_ids: list[str], routings: list[Any],
                       states: list[Any], discard: np.ndarray) -> None:
        gate = self._gate
        assert gate is not None
        receipt = gate.take_receipt()
        counters = gate.counters
        seen_mismatched, seen_failures = self._gate_seen
        routing.add_gate_counts(counters.mismatched_rows - seen_mismatched, counters.failures - seen_failures)
        self._gate_seen = (counters.mismatched_rows, counters.failures)
        routed_states = [s if r is not None else None for s, r in zip(states, routings)]
        if routing.pending is None and all(s is None for s in routed_states):
            return  # nothing planned, no EAD row: nothing to read back this step
        if receipt is not None and receipt.req_ids != req_ids:
            receipt = None  # not this batch's verification
        output = forced = vetoed = None
        if receipt is not None:
            tensors = [receipt.output] + [t for t in (receipt.forced, receipt.vetoed) if t is not None]
            host = [t.cpu().numpy() for t in tensors]  # one wait: the step's outputs are needed anyway
            output = host[0]
            if receipt.forced is not None:
                forced, vetoed = host[1], host[2]
        routing.commit(req_ids, emitted_rows(receipt, output, forced, vetoed, req_ids,
                                             routed_states, discard))

    def _parse_routing(self, state: Any) -> Any:
        from vllm_adaptive.routing.params import parse_request

        if state is None or state.sampling_params is None:
            return None
        assert self.routing is not None
        return parse_request(state.sampling_params.extra_args, self.routing.config)

    def _sample_routed(
        self, draft: RoutedDraft, hidden_states: torch.Tensor, sampling_metadata: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if draft.failed:
            return super()._sample_draft_tokens(hidden_states, sampling_metadata)
        logits = self.model.compute_logits(hidden_states)
        try:
            entropy = draft.entropy(logits)  # before _sample_from_logits divides by temperature
        except Exception:
            draft.failed = True
            self._routing_failed("draft")
            return self._sample_from_logits(logits, sampling_metadata)
        token_ids, probs = self._sample_from_logits(logits, sampling_metadata)
        try:
            draft.record(logits, token_ids, probs, entropy)
            end = draft.should_end()
        except Exception:
            draft.failed = True
            self._routing_failed("draft")
            return token_ids, probs
        if end:
            raise _DraftsEnded
        return token_ids, probs

    def _routing_failed(self, stage: str) -> None:
        assert self.routing is not None
        self.routing.record_failure(stage)
        key = "routing:" + stage
        if key not in self._failures_logged:
            self._failures_logged.add(key)
            logger.exception(
                "vllm-adaptive: EAD routing failed at stage %r; this step is verified losslessly "
                "(further failures at this stage are counted in "
                "vllm_adaptive:ead_failures_total{stage=%r}, not logged)", stage, stage)

    def routing_snapshot(self) -> dict[str, Any]:
        assert self.routing is not None
        return self.routing.snapshot()

    # --- helpers -----------------------------------------------------------------------------

    def _observe_verification(
        self, req_ids: list[str], num_rows: int, num_rejected_tokens_gpu: torch.Tensor | None
    ) -> None:
        """Feed the policy the verification of the drafts the target just checked."""
        assert self.policy is not None
        if num_rejected_tokens_gpu is None:
            return
        runner = self._runner
        scheduled = runner.num_decode_draft_tokens.np[:num_rows]  # -1: prompt chunk
        rejected = self._rejections_to_host(num_rejected_tokens_gpu[:num_rows])
        spec_token_ids = runner.input_batch.spec_token_ids
        drafts = [spec_token_ids[i] if n > 0 else () for i, n in enumerate(scheduled.tolist())]
        accepted = np.maximum(scheduled, 0).astype(np.int64) - rejected
        self.policy.observe_verification(req_ids, drafts, accepted)

    def _rejections_to_host(self, rejected: torch.Tensor) -> np.ndarray:
        """The rejection counts on the host (int64): one non-blocking copy into a persistent
        pinned buffer on a GPU, waited on by its event."""
        if rejected.device.type != "cuda":
            return rejected.numpy().astype(np.int64)
        buffer = self._rejected_host
        if buffer is None or buffer.shape[0] < rejected.shape[0] or buffer.dtype != rejected.dtype:
            buffer = self._rejected_host = torch.empty(
                max(rejected.shape[0], 256), dtype=rejected.dtype, pin_memory=True)
        host = buffer[: rejected.shape[0]]
        host.copy_(rejected, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        copied.synchronize()
        return host.numpy().astype(np.int64)

    def _failed(self, stage: str) -> None:
        """Count a failure at `stage` (policy.FAILURE_STAGES); log the first one of each stage."""
        assert self.policy is not None
        self.policy.record_failure(stage)
        if stage not in self._failures_logged:
            self._failures_logged.add(stage)
            logger.exception(
                "vllm-adaptive: adaptive drafting failed at stage %r; this step drafts as vLLM "
                "does (further failures at this stage are counted in "
                "vllm_adaptive:spec_failures_total{stage=%r}, not logged)", stage, stage,
            )

    def adaptive_state(self) -> dict[str, Any]:
        """What `vllm_adaptive.introspection` reports about this proposer."""
        if self.policy is None:
            return {"enabled": False}
        return {"enabled": True, **self.policy.snapshot()}
