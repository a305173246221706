"""DraftLengthPolicy: per-request draft lengths, early exit, and what verification feeds back.

The policy is the adaptive proposer without vLLM: these tests drive it as the proposer does
(begin, record per draft step, finish, observe_verification) with hand-made logits. Every test
runs twice: with the numpy decisions of the CPU path (host_math) and with the torch decisions a
GPU uses, both on CPU tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_adaptive.speculative.config import AdaptiveDraftConfig
from vllm_adaptive.speculative.policy import DraftLengthPolicy

VOCAB = 16


@pytest.fixture(autouse=True, params=[True, False], ids=["host-math", "device-math"])
def math_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Policies built without host_math use this run's path."""
    original = DraftLengthPolicy.__init__

    def init(self: DraftLengthPolicy, config: AdaptiveDraftConfig, device: str = "cpu",
             alive_check_lag: int | None = None, host_math: bool | None = None) -> None:
        original(self, config, device, alive_check_lag, request.param if host_math is None else host_math)

    monkeypatch.setattr(DraftLengthPolicy, "__init__", init)


def logits_with(top_tokens: list[int], flat: list[bool]) -> torch.Tensor:
    """One row per entry: a peaked distribution on top_tokens[r] (entropy ~1.4e-3 nats), or a
    flat one (entropy ln 16 = 2.77 nats) whose argmax is still top_tokens[r]."""
    rows = torch.zeros(len(top_tokens), VOCAB)
    for r, (token, is_flat) in enumerate(zip(top_tokens, flat)):
        rows[r, token] = 1e-3 if is_flat else 12.0
    return rows


def entropy_policy(k: int = 4, **overrides: object) -> DraftLengthPolicy:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=k, stop_rule="entropy",
                                 entropy_threshold=1.0, controller=False,
                                 controller_initial_k=min(k, 4), **overrides)
    return DraftLengthPolicy(config)


def draft(policy: DraftLengthPolicy, req_ids: list[str], steps: list[list[bool]], decoding=None,
          k: int = 4) -> tuple[list[list[int]], list[bool]]:
    """Run draft steps (flat[r] per step, token = 10 * step + r) until done or told to end."""
    decoding = decoding or [True] * len(req_ids)
    progress = policy.begin(req_ids, decoding, k)
    ended = []
    for step, flat in enumerate(steps):
        tokens = [10 * step + r for r in range(len(req_ids))]
        logits = logits_with([t % VOCAB for t in tokens], flat)
        progress.record(logits, torch.tensor(tokens), None)
        ended.append(progress.should_end())
        if ended[-1]:
            break
    return policy.finish(progress, req_ids, decoding), ended


def test_each_row_keeps_the_prefix_its_rule_kept() -> None:
    policy = entropy_policy()
    # row 0 never uncertain; row 1 uncertain at step 0; row 2 at step 1; row 3 at step 3
    steps = [[False, True, False, False], [False, False, True, False],
             [False, False, False, False], [False, False, False, True]]
    drafts, ended = draft(policy, ["a", "b", "c", "d"], steps)
    assert drafts == [[0, 10, 20, 30], [1], [2, 12], [3, 13, 23, 33]]
    assert ended == [False, False, False, False]
    counters = policy.counters
    assert counters.length_histogram == [0, 1, 1, 0, 2]
    assert (counters.draft_rows, counters.draft_tokens, counters.early_exits) == (4, 11, 0)


def test_the_loop_may_end_once_every_row_has_stopped() -> None:
    policy = entropy_policy()
    steps = [[True, False], [True, True], [False, False], [False, False]]
    drafts, ended = draft(policy, ["a", "b"], steps)
    assert ended == [False, True]  # after step 1 both rows stopped, two steps remain
    assert drafts == [[0], [1, 11]]
    assert (policy.counters.early_exits, policy.counters.draft_passes) == (1, 2)


def test_no_early_end_signal_after_the_last_step() -> None:
    policy = entropy_policy(k=1)
    drafts, ended = draft(policy, ["a"], [[True]], k=1)
    assert drafts == [[0]] and ended == [False]


def test_k_zero_drafts_nothing_and_counts_the_first_pass() -> None:
    policy = entropy_policy()
    progress = policy.begin(["a", "b"], [True, True], 0)
    assert progress.k == 0
    assert policy.finish(progress, ["a", "b"], [True, True]) == [[], []]
    assert policy.counters.draft_passes == 1 and policy.counters.length_histogram[0] == 2


def test_rows_of_prompt_chunks_are_neither_counted_nor_awaited() -> None:
    policy = entropy_policy()
    draft(policy, ["a", "b"], [[False, False]] * 4, decoding=[True, False])
    assert policy.counters.draft_rows == 1
    # a verification report for b (a draft the scheduler dropped) is ignored
    policy.observe_verification(["a", "b"], [[0, 10], [1, 11]], [1, 2])
    assert (policy.counters.verified_drafts, policy.counters.accepted_tokens) == (1, 1)


def test_verification_of_other_tokens_than_proposed_is_ignored() -> None:
    policy = entropy_policy()
    draft(policy, ["a", "b"], [[False, False]] * 4)
    # a: the scheduler kept the first two tokens (a prefix): counted; b: placeholders: ignored
    policy.observe_verification(["a", "b"], [[0, 10], [-1, -1, -1, -1]], [2, 0])
    assert (policy.counters.verified_drafts, policy.counters.verified_tokens) == (1, 2)
    assert policy.counters.accepted_tokens == 2
    # reports are used once: the same report again changes nothing
    policy.observe_verification(["a"], [[0, 10]], [2])
    assert policy.counters.verified_drafts == 1


def test_verification_calibrates_acceptance_by_confidence() -> None:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="specdec",
                                 specdec_threshold=0.9, calibration_bins=2, calibration_prior=1.0,
                                 controller=False)
    policy = DraftLengthPolicy(config)
    before = policy.calibrator.estimates().tolist()
    lengths = []
    for _ in range(20):
        drafts, _ = draft(policy, ["a"], [[False]] * 4)  # peaked: top_prob ~1, the upper bin
        lengths.append(len(drafts[0]))
        policy.observe_verification(["a"], drafts, [0])  # the first token rejected
    after = policy.calibrator.estimates().tolist()
    assert after[0] == before[0]  # no low-confidence token was observed
    assert after[1] == pytest.approx(0.75 / 21)  # prior 1 at 0.75, then 20 rejections
    # only each draft's rejected first token counts: tokens after it were never tested
    assert policy.calibrator.observed.tolist() == [0.0, 20.0]
    # the prior (0.75 per token) lets the first draft run to K; once acceptance is estimated
    # near 0, SpecDec++ stops every draft after its first token
    assert lengths[0] == 4 and lengths[-1] == 1


def test_adaedl_lambda_rises_per_request_when_acceptance_is_low() -> None:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="adaedl",
                                 adaedl_lambda=0.5, controller=False)
    policy = DraftLengthPolicy(config)
    draft(policy, ["low", "high"], [[False, False]] * 4)
    policy.observe_verification(["low", "high"], [[0, 10, 20, 30], [1, 11, 21, 31]], [0, 4])
    lam = {r: s.lam for r, s in policy.requests.items()}
    # AR: 0.5 * 0.9 + 0.5 * rate; low: 0.45 < 0.9 -> lambda' = 0.51; high: 0.95, all accepted
    assert lam["low"] == pytest.approx(0.9 * 0.5 + 0.1 * 0.51)
    assert lam["high"] == pytest.approx(0.5)


def test_adaedl_stops_rows_whose_bound_is_below_their_own_lambda() -> None:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="adaedl",
                                 adaedl_lambda=0.5, controller=False)
    policy = DraftLengthPolicy(config)
    policy.begin(["x"], [True], 4)  # creates the request's state
    policy.requests["x"].lam = 0.999  # bound of a peaked row: 1 - sqrt(0.2 * 1.4e-3) ~ 0.983
    drafts, _ = draft(policy, ["x", "y"], [[False, False]] * 4)
    assert drafts == [[0], [1, 11, 21, 31]]


def test_probabilistic_drafts_are_judged_on_the_probabilities_they_were_drawn_from() -> None:
    policy = entropy_policy()
    progress = policy.begin(["a", "b"], [True, True], 2)
    probs = torch.tensor([[1.0] + [0.0] * (VOCAB - 1), [1.0 / VOCAB] * VOCAB])
    progress.record(torch.zeros(2, VOCAB), torch.tensor([0, 5]), probs)  # logits say flat: unused
    progress.record(torch.zeros(2, VOCAB), torch.tensor([1, 6]), probs)
    assert policy.finish(progress, ["a", "b"], [True, True]) == [[0, 1], [5]]
    assert progress.draft_probs().shape == (2, 2, VOCAB)


def test_controller_caps_k_and_starts_at_its_initial_k() -> None:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=6, stop_rule="none",
                                 controller=True, controller_initial_k=3)
    policy = DraftLengthPolicy(config)
    assert policy.begin(["a"], [True], 6).k == 3
    assert policy.begin(["a"], [True], 2).k == 2  # the scheduler's K is a cap too
    assert policy.counters.cap_histogram[3] == 1 and policy.counters.cap_histogram[2] == 1


def test_controller_learns_that_drafting_does_not_pay_when_nothing_is_accepted() -> None:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="none",
                                 controller=True, controller_initial_k=4, controller_min_samples=4,
                                 controller_patience=2)
    policy = DraftLengthPolicy(config)
    for step in range(40):
        progress = policy.begin(["a", "b"], [True, True], 4)
        k = progress.k
        for s in range(k):
            progress.record(logits_with([s, s], [False, False]), torch.tensor([s, s]), None)
        policy.finish(progress, ["a", "b"], [True, True])
        # every draft token rejected; a step costs 10 ms plus 5 ms per verified token and
        # 4 ms per draft pass (timings vary a little so the time models see both features)
        tokens = 2 * (1 + k) + step % 2
        policy.observe_step(2, tokens, 0.010 + 0.005 * tokens, max(k, 1), 0.004 * max(k, 1))
        policy.observe_verification(["a", "b"], [list(range(k)), list(range(k))], [0, 0])
    assert policy.controller is not None and policy.controller.k == 0
    assert policy.token_acceptance("a") == 0.0


def test_idle_gaps_are_not_taken_for_verification_time() -> None:
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, controller=True)
    policy = DraftLengthPolicy(config)
    policy.observe_step(2, 4, 30.0, 1, 0.01)  # 30 s since the last step: the engine was idle
    assert policy.controller is not None
    assert policy.controller.verify_time.num_observations == 0
    assert policy.controller.draft_time.num_observations == 1
    policy.observe_step(2, 4, 0.05, 1, 0.01)
    assert policy.controller.verify_time.num_observations == 1


def test_snapshot_reports_mean_length_and_acceptance() -> None:
    policy = entropy_policy()
    draft(policy, ["a", "b"], [[False, True], [True, False], [False, False], [False, False]])
    policy.observe_verification(["a", "b"], [[0, 10], [1]], [1, 1])
    snapshot = policy.snapshot()
    assert snapshot["stop_rule"] == "entropy"
    assert snapshot["mean_draft_length"] == pytest.approx(1.5)
    assert snapshot["acceptance_rate"] == pytest.approx(2 / 3)
    assert math.isclose(sum(snapshot["counters"]["length_histogram"]), 2)


def test_auto_specdec_threshold_follows_the_measured_draft_cost_ratio() -> None:
    """theta = 1 - r, r = (draft pass + one more verified token per row) / a plain step."""
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=4, stop_rule="specdec",
                                 controller=True, controller_min_samples=4, controller_initial_k=4)
    policy = DraftLengthPolicy(config)
    assert policy.rule.threshold == pytest.approx(0.9)  # before any timing: r = 0.1
    for step in range(12):
        rows, k = 1 + step % 3, 1 + step % 4
        tokens = rows * (1 + k)
        # verify: 6 ms + 1 ms per row + 0.5 ms per token; draft: 1 ms + 2 ms per pass + 0.5 ms per pass-row
        verify_seconds = 0.006 + 0.001 * rows + 0.0005 * tokens
        draft_seconds = 0.001 + 0.002 * k + 0.0005 * k * rows
        policy.observe_step(rows, tokens, verify_seconds, k, draft_seconds)
    progress = policy.begin(["a", "b"], [True, True], 4)
    assert progress.k >= 1
    base = 0.006 + 0.001 * 2 + 0.0005 * 2
    extra = 0.002 + 0.0005 * 2 + 0.0005 * 2
    assert policy.cost_ratio == pytest.approx(extra / base, rel=1e-3)
    assert policy.rule.threshold == pytest.approx(1 - extra / base, rel=1e-3)


def test_pinned_draft_cost_ratio_and_fixed_threshold() -> None:
    pinned = DraftLengthPolicy(AdaptiveDraftConfig(enabled=True, stop_rule="specdec", draft_cost_ratio=0.05))
    pinned.begin(["a"], [True], 8)
    assert pinned.rule.threshold == pytest.approx(0.95)
    fixed = DraftLengthPolicy(AdaptiveDraftConfig(enabled=True, stop_rule="specdec", specdec_threshold=0.6))
    fixed.begin(["a"], [True], 8)
    assert fixed.rule.threshold == pytest.approx(0.6)


def test_failures_are_counted_by_stage() -> None:
    policy = entropy_policy()
    assert policy.counters.failure_stages == {"feedback": 0, "controller": 0, "stop_rule": 0, "finish": 0}
    policy.record_failure("stop_rule")
    policy.record_failure("stop_rule")
    policy.record_failure("feedback")
    assert policy.counters.failures == 3
    assert policy.counters.failure_stages == {"feedback": 1, "controller": 0, "stop_rule": 2, "finish": 0}
    assert policy.metrics_snapshot()["counters"]["failure_stages"]["stop_rule"] == 2


def test_failed_feedback_forgets_the_drafts_it_was_verifying(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm_adaptive.faults import FAULT_INJECT_ENV, InjectedFault, injected_faults

    policy = entropy_policy()
    draft(policy, ["a"], [[False]] * 4)
    monkeypatch.setenv(FAULT_INJECT_ENV, "spec:feedback")
    injected_faults.cache_clear()
    try:
        with pytest.raises(InjectedFault):
            policy.observe_verification(["a"], [[0, 10]], [2])
    finally:
        monkeypatch.delenv(FAULT_INJECT_ENV)
        injected_faults.cache_clear()
    # the step after a failed one never matches its verification against the old drafts
    policy.observe_verification(["a"], [[0, 10]], [2])
    assert policy.counters.verified_drafts == 0
