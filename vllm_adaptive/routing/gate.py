"""The gate between the routing proposer and vLLM's rejection sampler: small-model tokens
accepted unverified at the positions the plan names.

Entropy Adaptive Decoding lets the small (draft) model write while its entropy is low. In vLLM
that means: the small model's tokens at those positions go through verification as drafts, and
verification accepts them whatever the large (target) model would have written there. The
proposer decides which positions at the end of step t-1 (`propose`) and arms a `RoutingPlan`
here; at step t the patched `rejection_sample` (patches/rejection_sampler_rejection_sample.py)
calls `RoutingGate.rejection_sample`, which

1. matches each batch row with the plan by request id, and checks that the drafts the scheduler
   kept (`input_batch.spec_token_ids`) are a prefix of the planned ones (the scheduler may trim a
   draft: structured output, max_model_len); unmatched rows are verified as usual;
2. vetoes positions whose draft token the target's processed logits forbid (`-inf` after the
   grammar bitmask, bad words, allowed token ids, min_tokens): those are verified as usual, so
   every constraint wins over a forced token;
3. replaces each forced position's row of the target logits, in a copy, by a one-hot on the draft
   token (0 there, -inf elsewhere): its argmax is the draft (greedy) and its probability is 1, so
   `target_prob / draft_prob >= u` for every uniform u (random). Both vLLM's GPU kernels and the
   CPU build's C++ kernels then accept it; the uniforms do not depend on the logits, so every
   seeded stream is unchanged;
4. calls vLLM's `rejection_sample` and, for rows whose plan drops the bonus token (a draft whose
   last position is the small model's, so the owner of the next one is not known yet), turns the bonus slot into the
   placeholder -1. vLLM then counts one rejected token: the last draft token becomes the step's
   sampled token, which the next step feeds to both models, exactly as if the target had
   rejected and re-sampled it; both KV caches stay consistent;
5. leaves a `Receipt` (which flat positions were forced after the veto, which rows were matched
   and had their bonus dropped) for the proposer's next `propose`.

A row the plan does not name, and every row of a step without a plan, goes to vLLM's function
untouched (bit-identical). Any error here falls back to vLLM's function on the untouched inputs
(a lossless step), counted and logged once.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vllm_adaptive.faults import raise_if_injected

logger = logging.getLogger(__name__)

# vLLM's rejection sampler marks an empty output slot with this id (PLACEHOLDER_TOKEN_ID).
PLACEHOLDER_TOKEN_ID = -1


@dataclasses.dataclass(frozen=True)
class RowPlan:
    """One request's draft as handed to the scheduler, and what to do with it at verification."""

    tokens: tuple[int, ...]
    forced: tuple[bool, ...]  # per draft position: accept without verification
    drop_bonus: bool  # the draft is the small model's to the end: no target token after it

    def __post_init__(self) -> None:
        if len(self.forced) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} draft tokens but {len(self.forced)} forced flags")
        if self.drop_bonus and not (self.tokens and self.forced[-1]):
            raise ValueError("drop_bonus needs a draft whose last position is forced")


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    step: int  # the proposer's step counter when it armed the plan
    rows: dict[str, RowPlan]


@dataclasses.dataclass
class Receipt:
    """What the gate did at one verification (device tensors are not read here)."""

    step: int | None  # the plan's step (None: verified without a plan)
    req_ids: list[str]  # rows in batch order
    num_draft_tokens: list[int]  # scheduled drafts per row
    output: torch.Tensor  # [rows, max_spec_len + 1] the emitted tokens (-1: none)
    forced: torch.Tensor | None  # [total drafts] bool: accepted without verification
    vetoed: torch.Tensor | None  # [same] bool: planned forced, verified (a constraint forbids it)
    matched: list[bool]  # per row: the plan applied to it
    bonus_dropped: list[bool]  # per row


@dataclasses.dataclass
class GateCounters:
    plans: int = 0  # verifications that had a plan
    matched_rows: int = 0  # rows the plan applied to
    mismatched_rows: int = 0  # planned rows whose scheduled draft was not a prefix of the plan
    forced_positions: int = 0  # positions planned as forced (vetoes included)
    failures: int = 0  # errors caught here; that verification was lossless


class RoutingGate:
    """The plan slot and the rejection-sample wrapper of one worker process."""

    def __init__(self, runner: Any) -> None:
        self._runner = weakref.ref(runner)
        self._lock = threading.Lock()
        self._plan: RoutingPlan | None = None
        self._receipt: Receipt | None = None
        self.counters = GateCounters()
        self._failure_logged = False

    # --- the proposer's side -------------------------------------------------------------------

    def arm(self, plan: RoutingPlan | None) -> None:
        """The plan for the next verification (None: verify everything)."""
        with self._lock:
            self._plan = plan if plan is not None and plan.rows else None

    def take_receipt(self) -> Receipt | None:
        """The receipt of the last verification since the previous call (None: the sampler took
        its plain path); also disarms any plan the sampler did not consume."""
        with self._lock:
            receipt, self._receipt, self._plan = self._receipt, None, None
        return receipt

    # --- the sampler's side ----------------------------------------------------------------------

    def rejection_sample(self, original: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        with self._lock:
            plan, self._plan = self._plan, None
        try:
            bound = _signature(original).bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)  # vLLM's own call is wrong: let it say so
        if plan is not None:
            try:
                raise_if_injected("routing:gate")
                return self._sample_with_plan(original, plan, bound)
            except Exception:  # noqa: BLE001 - a lossless step instead
                self.counters.failures += 1
                if not self._failure_logged:
                    self._failure_logged = True
                    logger.exception(
                        "vllm-adaptive: the routing gate failed; this verification is lossless "
                        "(further failures are counted in vllm_adaptive:ead_failures_total, not "
                        "logged)")
        output = original(*args, **kwargs)
        self._leave_receipt(None, bound, output, None, None, None, None)
        return output

    def _leave_receipt(
        self, step: int | None, bound: inspect.BoundArguments, output: torch.Tensor,
        forced: torch.Tensor | None, vetoed: torch.Tensor | None, matched: list[bool] | None,
        dropped: list[bool] | None,
    ) -> None:
        try:
            runner = self._runner()
            num_draft_tokens = list(bound.arguments["num_draft_tokens"])
            rows = len(num_draft_tokens)
            req_ids = list(runner.input_batch.req_ids[:rows]) if runner is not None else []
            receipt = Receipt(step, req_ids, num_draft_tokens, output, forced, vetoed,
                              matched or [False] * rows, dropped or [False] * rows)
        except Exception:  # noqa: BLE001 - no receipt: the proposer counts the step as unknown
            receipt = None
        with self._lock:
            self._receipt = receipt

    def _sample_with_plan(
        self, original: Callable[..., torch.Tensor], plan: RoutingPlan, bound: inspect.BoundArguments
    ) -> torch.Tensor:
        arguments = bound.arguments
        num_draft_tokens: list[int] = list(arguments["num_draft_tokens"])
        runner = self._runner()
        if runner is None:
            raise RuntimeError("the model runner is gone")
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: len(num_draft_tokens)])
        flat, drops, matched = match_plan(plan, req_ids, num_draft_tokens, batch.spec_token_ids)
        counters = self.counters
        counters.plans += 1
        counters.matched_rows += sum(matched)
        counters.mismatched_rows += sum(1 for r, m in zip(req_ids, matched) if r in plan.rows and not m)
        counters.forced_positions += len(flat)
        target_logits: torch.Tensor = arguments["target_logits"]
        total = target_logits.shape[0]
        device = target_logits.device
        forced = torch.zeros(total, dtype=torch.bool, device=device)
        vetoed = torch.zeros(total, dtype=torch.bool, device=device)
        if flat:
            index = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
            arguments["target_logits"], allowed = force_rows(
                target_logits, arguments["draft_token_ids"], index)
            forced[index] = allowed
            vetoed[index] = ~allowed
        output = original(*bound.args, **bound.kwargs)
        if drops:
            rows = torch.tensor([r for r, _ in drops], dtype=torch.int64).to(device, non_blocking=True)
            cols = torch.tensor([c for _, c in drops], dtype=torch.int64).to(device, non_blocking=True)
            output[rows, cols] = PLACEHOLDER_TOKEN_ID
        dropped = [False] * len(req_ids)
        for r, _ in drops:
            dropped[r] = True
        self._leave_receipt(plan.step, bound, output, forced, vetoed, matched, dropped)
        return output


def match_plan(
    plan: RoutingPlan, req_ids: Sequence[str], num_draft_tokens: Sequence[int],
    scheduled: Sequence[Sequence[int]],
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """(flat indices of the positions to force, (row, bonus column) of the bonuses to drop, per row
    whether the plan applied). A row applies when the scheduler kept a prefix of the planned
    draft; a trimmed draft keeps its bonus."""
    flat: list[int] = []
    drops: list[tuple[int, int]] = []
    matched = [False] * len(req_ids)
    start = 0
    for row, (req_id, n) in enumerate(zip(req_ids, num_draft_tokens)):
        entry = plan.rows.get(req_id)
        if entry is not None and n > 0:
            kept = list(scheduled[row])
            if len(kept) == n and n <= len(entry.tokens) and tuple(kept) == entry.tokens[:n]:
                matched[row] = True
                flat.extend(start + i for i in range(n) if entry.forced[i])
                if entry.drop_bonus and n == len(entry.tokens):
                    drops.append((row, n))
        start += n
    return flat, drops, matched


def force_rows(
    target_logits: torch.Tensor, draft_token_ids: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of `target_logits` whose rows `index` are one-hot on their draft token, except where
    the row forbids that token (-inf or NaN there: a constraint); and the [len(index)] mask of the
    rows forced. No host synchronisation."""
    rows = target_logits.index_select(0, index)
    draft = draft_token_ids.index_select(0, index).to(torch.int64).unsqueeze(1)
    allowed = torch.isfinite(rows.gather(1, draft)).squeeze(1)
    one_hot = torch.full_like(rows, float("-inf")).scatter_(1, draft, 0.0)
    forced_logits = target_logits.clone()
    forced_logits.index_copy_(0, index, torch.where(allowed.unsqueeze(1), one_hot, rows))
    return forced_logits, allowed


_signatures: dict[Any, inspect.Signature] = {}


def _signature(function: Callable[..., Any]) -> inspect.Signature:
    signature = _signatures.get(function)
    if signature is None:
        signature = _signatures[function] = inspect.signature(function)
    return signature


# --- the process's gate --------------------------------------------------------------------------

_current: RoutingGate | None = None
_current_lock = threading.Lock()


def install(gate: RoutingGate) -> None:
    """Make `gate` the one the patched rejection_sample uses in this process. One routed proposer
    per process: a second one is an error (it would take the first one's plans)."""
    global _current
    with _current_lock:
        if _current is not None and _current is not gate and _current._runner() is not None:
            raise RuntimeError("a routing proposer is already running in this process")
        _current = gate


def uninstall(gate: RoutingGate) -> None:
    global _current
    with _current_lock:
        if _current is gate:
            _current = None


def current() -> RoutingGate | None:
    return _current
