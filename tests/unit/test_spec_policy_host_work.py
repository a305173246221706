"""DraftLengthPolicy without per-row or per-draft-step host work (issue #17).

- The alive check read `lag` draft steps late runs at most `lag` extra steps, and those steps
  change no draft: every row's draft equals the one a per-step check gives (a reference written
  here, row by row in plain Python).
- Per-request state lives in arrays indexed by batch row: it follows the batch when rows are
  reordered, removed and added, and a request that comes back gets its state back.
- The proposer's StepTimer reports CUDA-event timings only once the events have completed, in
  order (a stand-in event class replaces torch.cuda.Event).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_adaptive.speculative.config import AdaptiveDraftConfig
from vllm_adaptive.speculative.policy import DraftLengthPolicy

VOCAB = 16
THRESHOLD = 1.0  # nats; a flat row (ln 16 = 2.77) is above it, a peaked row (1.4e-3) below


def logits_for(flat: list[bool], tokens: list[int]) -> torch.Tensor:
    rows = torch.zeros(len(flat), VOCAB)
    for r, (is_flat, token) in enumerate(zip(flat, tokens)):
        rows[r, token % VOCAB] = 1e-3 if is_flat else 12.0
    return rows


def reference_drafts(pattern: list[list[bool]], k: int, keep_stopping_token: bool) -> tuple[list[list[int]], int]:
    """Per-step check, row by row: a row drafts token 10*step + row until its first flat step
    (kept when keep_stopping_token); the loop ends after the step at which every row has
    stopped, or at K. Returns the drafts and the steps run."""
    rows = len(pattern[0])
    drafts: list[list[int]] = [[] for _ in range(rows)]
    alive = [True] * rows
    steps = 0
    for step in range(k):
        steps += 1
        for r in range(rows):
            if not alive[r]:
                continue
            if pattern[step][r]:
                alive[r] = False
                if keep_stopping_token:
                    drafts[r].append(10 * step + r)
            else:
                drafts[r].append(10 * step + r)
        if not any(alive) and step + 1 < k:
            break
    return drafts, steps


def run_policy(pattern: list[list[bool]], k: int, lag: int, keep_stopping_token: bool) -> tuple[list[list[int]], int]:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=k, stop_rule="entropy",
                                 entropy_threshold=THRESHOLD, controller=False)
    policy = DraftLengthPolicy(config, alive_check_lag=lag, host_math=False)  # the device path's lag
    if not keep_stopping_token:
        policy.rule = type(policy.rule)(threshold=THRESHOLD, keep_stopping_token=False)
    rows = len(pattern[0])
    req_ids = [f"r{r}" for r in range(rows)]
    progress = policy.begin(req_ids, [True] * rows, k)
    for step in range(k):
        tokens = [10 * step + r for r in range(rows)]
        progress.record(logits_for(pattern[step], tokens), torch.tensor(tokens), None)
        if progress.should_end():
            break
    return policy.finish(progress, req_ids, [True] * rows), progress.steps


@settings(max_examples=80, deadline=None)
@given(
    k=st.integers(1, 6),
    rows=st.integers(1, 5),
    lag=st.integers(0, 3),
    keep=st.booleans(),
    data=st.data(),
)
def test_lagged_alive_check_gives_the_drafts_of_the_per_step_check(
    k: int, rows: int, lag: int, keep: bool, data: st.DataObject
) -> None:
    pattern = data.draw(st.lists(st.lists(st.booleans(), min_size=rows, max_size=rows), min_size=k, max_size=k))
    expected, expected_steps = reference_drafts(pattern, k, keep)
    drafts, steps = run_policy(pattern, k, lag, keep)
    assert drafts == expected
    assert steps == min(k, expected_steps + lag)  # at most `lag` extra steps, never past K


def test_lagged_check_ends_the_loop_lag_steps_after_every_row_stopped() -> None:
    pattern = [[True, True]] + [[False, False]] * 5  # both rows stop at step 0
    assert run_policy(pattern, 6, 0, True) == ([[0], [1]], 1)
    assert run_policy(pattern, 6, 2, True) == ([[0], [1]], 3)


def adaedl_policy(host_math: bool = True) -> DraftLengthPolicy:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="adaedl",
                                 adaedl_lambda=0.5, controller=True, controller_initial_k=4)
    return DraftLengthPolicy(config, host_math=host_math)


def draft_rows(policy: DraftLengthPolicy, req_ids: list[str]) -> list[list[int]]:
    """One step's drafts for `req_ids` (peaked rows: every row drafts to K)."""
    progress = policy.begin(req_ids, [True] * len(req_ids), 4)
    for step in range(progress.k):
        tokens = [100 * step + r for r in range(len(req_ids))]
        progress.record(logits_for([False] * len(req_ids), tokens), torch.tensor(tokens), None)
    return policy.finish(progress, req_ids, [True] * len(req_ids))


@pytest.mark.parametrize("host_math", [True, False])
def test_request_state_follows_the_batch_when_rows_are_reordered_removed_and_added(host_math: bool) -> None:
    policy = adaedl_policy(host_math)
    drafts = draft_rows(policy, ["a", "b", "c"])
    policy.observe_verification(["a", "b", "c"], drafts, [4, 0, 2])
    # observed: accepted + the first rejected token, at most the draft's 4
    assert policy.rows.observed.tolist() == [4.0, 1.0, 3.0]
    lam = policy.rows.lam.tolist()
    # The next step's batch: "b" left, the rest reordered, "d" is new.
    progress = policy.begin(["c", "a", "d"], [True] * 3, 4)
    assert policy.rows.req_ids == ["c", "a", "d"]
    assert policy.rows.observed.tolist() == [3.0, 4.0, 0.0]
    assert policy.rows.lam.tolist() == [lam[2], lam[0], 0.5]
    assert progress.lam.tolist() == pytest.approx([lam[2], lam[0], 0.5])  # the stop rule's
    assert policy.requests["b"].observed == 1.0  # set aside, not lost
    # the controller reads each row's acceptance from the arrays, in row order (d: the engine's)
    rates = policy.row_acceptance(np.ones(3, dtype=bool), 0.5)
    assert rates.tolist() == [2 / 3, 1.0, 0.5]


def test_verification_after_a_reorder_matches_each_row_with_its_own_draft() -> None:
    policy = adaedl_policy()
    drafts = draft_rows(policy, ["a", "b", "c"])
    # The report comes in the new batch order ("b" left, "d" is new), each row's own draft.
    by_id = dict(zip(["a", "b", "c"], drafts))
    policy.observe_verification(["c", "a", "d"], [by_id["c"], by_id["a"], []], [0, 4, 0])
    lam = {r: policy.requests[r].lam for r in ("a", "b", "c", "d")}
    # AR = 0.5 * 0.9 + 0.5 * rate: c (rate 0) -> 0.45 < 0.9: lambda rises; a (all accepted): stays
    assert lam["c"] == pytest.approx(0.9 * 0.5 + 0.1 * 0.51)
    assert lam["a"] == pytest.approx(0.5) and lam["b"] == 0.5 and lam["d"] == 0.5
    assert policy.token_acceptance("a") == 4 / 4 and policy.token_acceptance("c") == 0.0
    assert policy.counters.verified_drafts == 2


def test_a_request_that_comes_back_gets_its_state_back() -> None:
    policy = adaedl_policy()
    drafts = draft_rows(policy, ["a", "b"])
    policy.observe_verification(["a", "b"], drafts, [0, 4])
    lam_a = policy.requests["a"].lam
    draft_rows(policy, ["b"])  # "a" was not scheduled this step
    assert policy.rows.req_ids == ["b"]
    draft_rows(policy, ["x", "a"])
    assert policy.rows.req_ids == ["x", "a"]
    assert policy.rows.lam.tolist() == [0.5, pytest.approx(lam_a)]
    assert policy.rows.observed.tolist() == [0.0, 1.0]


def test_a_draft_is_not_matched_to_another_request_after_a_reorder() -> None:
    policy = adaedl_policy()
    drafts = draft_rows(policy, ["a", "b"])
    # the rows swapped, and each row reports the other request's tokens: nothing matches
    policy.observe_verification(["b", "a"], [drafts[0], drafts[1]], [4, 4])
    assert policy.counters.verified_drafts == 0


class FakeEvent:
    """torch.cuda.Event's surface that StepTimer uses, with a settable clock and completion."""

    clock = 0.0

    def __init__(self) -> None:
        self.time: float | None = None
        self.done = False

    def record(self) -> None:
        self.time = FakeEvent.clock

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: FakeEvent) -> float:
        assert self.time is not None and end.time is not None
        return (end.time - self.time) * 1000.0  # milliseconds, as CUDA events report


def test_step_timer_reports_event_timings_once_completed_in_order() -> None:
    from vllm_adaptive.speculative.proposer import StepTimer

    events: list[FakeEvent] = []

    def factory() -> FakeEvent:
        events.append(FakeEvent())
        return events[-1]

    reports: list[tuple] = []
    timer = StepTimer(lambda *args: reports.append(args), event_factory=factory)
    FakeEvent.clock = 1.0
    timer.start()
    FakeEvent.clock = 1.5
    timer.end(2, 4, 3)  # step 1: draft 0.5 s
    assert reports == []  # its end event has not completed: nothing read, nothing waited for
    FakeEvent.clock = 3.5  # the target's step: 2 s
    timer.start()
    FakeEvent.clock = 4.0
    events[1].done = True
    timer.end(2, 8, 1)  # step 2: draft 0.5 s; step 1 can be read now
    assert reports == [(2, 4, None, 3, 0.5)]
    events[3].done = True
    timer.collect()
    assert reports == [(2, 4, None, 3, 0.5), (2, 8, 2.0, 1, 0.5)]
