"""The routing policy's step logic without an engine (vllm_adaptive.routing.policy).

Each test drives `begin` / `record` / `finish` / `commit` with scripted entropies and tokens and
checks the drafts, the plan and the committed machine state against what the rule gives by
hand (vllm_adaptive.routing.machine.ReferenceMachine) for the positions verification emitted.
Every test runs with the machine in torch tensors and in numpy arrays (`host_math`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vllm_adaptive.routing.config import RoutingConfig
from vllm_adaptive.routing.machine import ReferenceMachine
from vllm_adaptive.routing.params import RequestRouting
from vllm_adaptive.routing.policy import EmittedRow, RoutingPolicy, entropy_bits, entropy_bits_host

K = 4
LOW, HIGH = 0.5, 3.0  # entropies below / above the tau used here (1.0)
HOST_MATH = False  # set per test by the `host_math` fixture


@pytest.fixture(params=[False, True], ids=["torch", "host"], autouse=True)
def host_math(request: pytest.FixtureRequest) -> bool:
    global HOST_MATH
    HOST_MATH = request.param
    return request.param


def new_policy(capacity: int = 64, large_draft_tokens: int | None = None,
               min_drafting_fraction: float = 0.0) -> RoutingPolicy:
    config = RoutingConfig(enabled=True, large_draft_tokens=large_draft_tokens,
                           min_drafting_fraction=min_drafting_fraction)
    policy = RoutingPolicy(config, K, capacity=capacity, host_math=HOST_MATH)
    assert policy.store.host == HOST_MATH
    return policy


def stored(policy: RoutingPolicy, req_id: str):  # noqa: ANN201 (a SwitchState)
    return policy.store.select(policy._index([policy.slot_of[req_id]]))


def routing(mode: str, tau: float = 1.0, window: int = 1, min_stint: int = 0) -> RequestRouting:
    return RequestRouting(tau=tau, window=window, min_stint=min_stint, mode=mode)


def emitted(count: int, forced: list[bool], dropped: bool = False, tokens: list[int] | None = None,
            previous: int = 5, max_tokens: int | None = 100, stop: frozenset[int] = frozenset(),
            min_tokens: int = 0) -> EmittedRow:
    return EmittedRow(tokens, count, forced, 0, dropped, previous, max_tokens, min_tokens, stop)


def draft_steps(policy: RoutingPolicy, req_ids: list[str], routings: list[RequestRouting | None],
                entropies: list[list[float]]) -> tuple[list[list[int]], object]:
    """One propose: rows drafting tokens 100 + 10 * row + step with the given entropies per step."""
    draft = policy.begin(req_ids, routings, np.ones(len(req_ids), dtype=bool))
    assert draft is not None
    for step, row_entropies in enumerate(entropies):
        tokens = torch.tensor([100 + 10 * r + step for r in range(len(req_ids))])
        draft.record(torch.zeros(len(req_ids), 8), tokens, None, torch.tensor(row_entropies, dtype=torch.float64))
        if draft.should_end():
            break
    return policy.finish(draft)


def test_entropy_bits_of_uniform_and_masked_rows() -> None:
    logits = torch.zeros(2, 8)
    logits[1, 4:] = float("-inf")
    assert entropy_bits(logits).tolist() == pytest.approx([3.0, 2.0])


def test_faithful_draft_stops_before_the_first_large_position() -> None:
    policy = new_policy()
    drafts, plan = draft_steps(policy, ["a"], [routing("faithful")], [[LOW], [LOW], [HIGH], [LOW]])
    assert drafts == [[100, 101]]
    assert plan.rows["a"].forced == (True, True) and not plan.rows["a"].drop_bonus


def test_faithful_draft_small_to_k_drops_the_bonus() -> None:
    policy = new_policy()
    drafts, plan = draft_steps(policy, ["a"], [routing("faithful")], [[LOW]] * K)
    assert drafts == [[100, 101, 102, 103]] and plan.rows["a"].drop_bonus


def test_faithful_large_row_drafts_nothing_and_the_loop_ends_early() -> None:
    policy = new_policy()
    draft = policy.begin(["a"], [routing("faithful")], np.ones(1, dtype=bool))
    draft.record(torch.zeros(1, 8), torch.tensor([7]), None, torch.tensor([HIGH], dtype=torch.float64))
    assert draft.should_end()
    drafts, plan = policy.finish(draft)
    assert drafts == [[]] and plan.rows == {}


def test_speculative_forces_small_positions_and_verifies_large_ones() -> None:
    policy = new_policy()
    drafts, plan = draft_steps(policy, ["a", "b"], [routing("speculative"), None],
                               [[LOW, 9.0], [HIGH, 9.0], [LOW, 9.0], [LOW, 9.0]])
    assert drafts == [[100, 101, 102, 103], [110, 111, 112, 113]]  # b (no EAD): K tokens, verified
    assert plan.rows["a"].forced == (True, False, True, True) and plan.rows["a"].drop_bonus
    assert "b" not in plan.rows


@pytest.mark.parametrize(("large_draft", "entropies", "forced"), [
    (1, [LOW, HIGH, LOW, LOW], (True, False)),  # ends at the first LARGE position
    (2, [HIGH, LOW, HIGH, LOW], (False, True, False)),  # at the second
    (2, [LOW, HIGH, LOW, LOW], (True, False, True, True)),  # one LARGE position: to K
])
def test_speculative_draft_ends_at_its_large_draft_tokens_th_large_position(
    large_draft: int, entropies: list[float], forced: tuple[bool, ...]
) -> None:
    policy = new_policy(large_draft_tokens=large_draft)
    draft = policy.begin(["a"], [routing("speculative")], np.ones(1, dtype=bool))
    steps = 0
    for step, entropy in enumerate(entropies):
        draft.record(torch.zeros(1, 8), torch.tensor([100 + step]), None,
                     torch.tensor([entropy], dtype=torch.float64))
        steps += 1
        if draft.should_end():
            break
    assert steps == len(forced)  # the loop ends with the row's draft (no row needs all K)
    drafts, plan = policy.finish(draft)
    assert drafts == [[100 + i for i in range(len(forced))]]
    assert plan.rows["a"].forced == forced
    assert plan.rows["a"].drop_bonus == (len(forced) == K and forced[-1])


def test_a_row_without_ead_keeps_the_loop_to_k_while_an_ead_draft_ends() -> None:
    policy = new_policy(large_draft_tokens=1)
    drafts, plan = draft_steps(policy, ["a", "b"], [routing("speculative"), None],
                               [[LOW, 9.0], [HIGH, 9.0], [LOW, 9.0], [LOW, 9.0]])
    assert drafts == [[100, 101], [110, 111, 112, 113]]
    assert plan.rows["a"].forced == (True, False) and not plan.rows["a"].drop_bonus


# Four speculative rows (large_draft_tokens 1): rows b, c, d end at their first LARGE position
# (steps 1, 2 and 3), a stays the small model's. Per step: entropies of a, b, c, d.
FOUR_ROWS = [[LOW, HIGH, LOW, LOW], [LOW, LOW, HIGH, LOW], [LOW, LOW, LOW, HIGH], [LOW, LOW, LOW, LOW]]


@pytest.mark.parametrize(("fraction", "steps"), [
    (0.0, 4),  # the loop runs while a row drafts: a's stint holds it to K
    (0.25, 4),  # 1 row of 4 still drafts after step 3: not fewer than 0.25 * 4
    (0.5, 3),  # after step 3 one row (a) drafts, fewer than 0.5 * 4: cut
    (0.9, 1),  # after step 1 three rows draft, fewer than 3.6
])
def test_the_loop_ends_once_fewer_than_min_drafting_fraction_of_the_rows_draft(
    fraction: float, steps: int,
) -> None:
    policy = new_policy(large_draft_tokens=1, min_drafting_fraction=fraction)
    ids = ["a", "b", "c", "d"]
    drafts, plan = draft_steps(policy, ids, [routing("speculative")] * 4, FOUR_ROWS)
    assert len(drafts[0]) == steps
    # a: the small model's to the end of the loop, so no target token after it (as at K).
    assert plan.rows["a"].forced == (True,) * steps and plan.rows["a"].drop_bonus
    for row, own_end in ((1, 1), (2, 2), (3, 3)):  # own end: the first LARGE position, verified
        length = min(own_end, steps)
        expected = (True,) * (length - 1) + ((False,) if length == own_end else (True,))
        plan_row = plan.rows.get(ids[row])
        forced = plan_row.forced if plan_row is not None else (False,) * length
        assert forced == expected, (ids[row], forced)
        assert drafts[row] == [100 + 10 * row + s for s in range(length)]
        if plan_row is not None:  # cut on a small-model position: no target token after it
            assert plan_row.drop_bonus == expected[-1]
    assert policy.counters.draft_passes == steps


def test_a_faithful_row_cut_by_min_drafting_fraction_keeps_its_small_draft_without_bonus() -> None:
    policy = new_policy(min_drafting_fraction=0.6)
    drafts, plan = draft_steps(policy, ["a", "b"], [routing("faithful")] * 2,
                               [[LOW, LOW], [LOW, HIGH], [LOW, LOW], [LOW, LOW]])
    # After step 2 only a drafts (b reached the large model): 1 < 0.6 * 2, the loop ends.
    assert drafts == [[100, 101], [110]]
    assert plan.rows["a"].forced == (True, True) and plan.rows["a"].drop_bonus
    assert plan.rows["b"].forced == (True,) and not plan.rows["b"].drop_bonus


def test_min_drafting_fraction_does_not_end_a_loop_that_a_row_without_ead_needs() -> None:
    policy = new_policy(large_draft_tokens=1, min_drafting_fraction=1.0)
    drafts, _ = draft_steps(policy, ["a", "b"], [routing("speculative"), None],
                            [[LOW, 9.0], [HIGH, 9.0], [LOW, 9.0], [LOW, 9.0]])
    assert drafts == [[100, 101], [110, 111, 112, 113]]


def test_commit_takes_the_state_after_the_emitted_positions_and_counts_writers() -> None:
    policy = new_policy()
    entropies = [0.2, 0.4, 2.5, 0.1]
    draft_steps(policy, ["a"], [routing("speculative", window=2)], [[h] for h in entropies])
    # Verification accepted the forced first two positions and rejected the third (a recovered
    # token there): 3 tokens emitted, the machine moves to its state after position 3.
    policy.commit(["a"], [emitted(3, [True, True, False, True])])
    reference = ReferenceMachine(tau=1.0, window=2, min_stint=0)
    owners = [reference.step(h) for h in entropies[:3]]
    state = stored(policy, "a")
    assert bool(state.large[0]) == reference.large and int(state.stint[0]) == reference.stint
    assert int(state.count[0]) == 3
    assert owners == [False, False, True]
    counters = policy.counters
    assert (counters.small_tokens, counters.large_tokens) == (2, 1)
    assert (counters.switches_to_large, counters.switches_to_small) == (1, 0)
    # One completed stint: the small model's two positions (bucket "<= 2"); the large one is open.
    assert counters.stint_histogram[:3] == [0, 1, 0] and sum(counters.stint_histogram) == 1
    assert counters.stint_tokens == 2
    assert counters.target_passes == 1


def test_dropped_bonus_counts_every_emitted_token_as_accepted() -> None:
    policy = new_policy()
    draft_steps(policy, ["a"], [routing("faithful")], [[LOW]] * K)
    policy.commit(["a"], [emitted(K, [True] * K, dropped=True)])
    assert (policy.counters.small_tokens, policy.counters.large_tokens) == (K, 0)
    assert int(stored(policy, "a").count[0]) == K


def test_rows_without_a_plan_count_their_tokens_as_the_large_models() -> None:
    policy = new_policy()
    policy.commit(["a", "b"], [emitted(1, []), None])  # a's first token (the prefill's), b: no EAD
    assert (policy.counters.small_tokens, policy.counters.large_tokens) == (0, 1)


@pytest.mark.parametrize("row,kept", [
    (emitted(5, [], tokens=[1, 2, 3, 4, 5], previous=10, max_tokens=12), 2),  # max_tokens
    (emitted(5, [], tokens=[1, 2, 9, 4, 5], stop=frozenset({9})), 3),  # a stop token ends it
    (emitted(5, [], tokens=[1, 9, 3, 9, 5], previous=1, min_tokens=4, stop=frozenset({9})), 4),
    (emitted(1, [], tokens=None, previous=3, max_tokens=3), 0),
    (emitted(3, [], tokens=[1, 2, 3], max_tokens=None), 3),
])
def test_emitted_tokens_are_cut_where_the_request_stops(row: EmittedRow, kept: int) -> None:
    assert row.kept() == kept


def test_state_follows_a_request_across_batches_and_slots_grow() -> None:
    policy = new_policy(capacity=1)
    draft_steps(policy, ["a"], [routing("speculative")], [[HIGH]] * K)
    policy.commit(["a"], [emitted(K + 1, [False] * K)])  # all verified and accepted, bonus kept
    # A new request joins first in the batch: the store grows, "a" keeps its state.
    draft_steps(policy, ["b", "a"], [routing("speculative"), routing("speculative")],
                [[LOW, LOW]] * K)
    state = stored(policy, "a")
    assert bool(state.large[0]) and int(state.stint[0]) == K and int(state.count[0]) == K
    assert policy.store.large.shape[0] >= 2
    policy.forget(lambda r: r == "b")
    assert "a" not in policy.slot_of and "b" in policy.slot_of


def test_no_ead_row_means_no_routed_draft() -> None:
    policy = new_policy()
    assert policy.begin(["a"], [None], np.ones(1, dtype=bool)) is None
    assert policy.begin(["a"], [routing("faithful")], np.zeros(1, dtype=bool)) is None


def test_snapshot_reports_fractions() -> None:
    policy = new_policy()
    policy.counters.small_tokens, policy.counters.large_tokens, policy.counters.target_passes = 3, 1, 2
    snapshot = policy.snapshot()
    assert snapshot["large_fraction"] == 0.25 and snapshot["target_passes_per_token"] == 0.5
    assert math.isclose(snapshot["counters"]["small_tokens"], 3)


def test_host_entropy_equals_the_torch_entropy() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=generator) * torch.tensor([0.1, 1, 3, 10, 30, 1])[:, None]
    logits[5, 100:] = float("-inf")  # masked entries count 0
    host = entropy_bits_host(logits)
    assert host.dtype == np.float64
    np.testing.assert_allclose(host, entropy_bits(logits).numpy(), rtol=1e-5, atol=1e-5)
    assert entropy_bits_host(torch.zeros(1, 8)).tolist() == pytest.approx([3.0])


def test_host_math_needs_a_cpu_device() -> None:
    with pytest.raises(ValueError, match="host_math needs a CPU device"):
        RoutingPolicy(RoutingConfig(enabled=True), K, device="meta", host_math=True)
    assert RoutingPolicy(RoutingConfig(enabled=True), K).host  # the default on CPU


@pytest.mark.parametrize("seed", range(3))
def test_host_and_torch_machines_take_the_same_decisions(seed: int) -> None:
    """Both backends through 30 engine steps of a churning batch (faithful and speculative rows,
    windows, stints, partial verification): the same drafts, plans, counters and stored state."""
    rng = np.random.default_rng(seed)
    policies = [RoutingPolicy(RoutingConfig(enabled=True), K, capacity=2, host_math=h) for h in (False, True)]
    knobs = {f"r{i}": routing(str(rng.choice(["faithful", "speculative"])), tau=float(rng.uniform(0.5, 2.0)),
                              window=int(rng.integers(1, 5)), min_stint=int(rng.integers(0, 3)))
             for i in range(8)}
    for step in range(30):
        req_ids = sorted(rng.choice(sorted(knobs), size=int(rng.integers(1, 6)), replace=False).tolist())
        routings = [knobs[r] if i == 0 or rng.random() < 0.8 else None for i, r in enumerate(req_ids)]
        entropies = rng.uniform(0.0, 3.0, size=(K, len(req_ids))).round(3).tolist()
        results = [draft_steps(p, req_ids, routings, entropies) for p in policies]
        (drafts, plan), (host_drafts, host_plan) = results
        assert host_drafts == drafts and host_plan == plan, f"step {step}"
        rows = [None if r is None else emitted(min(len(d) + 1, int(rng.integers(1, K + 2))), [True] * len(d))
                for r, d in zip(routings, drafts)]
        for policy in policies:
            policy.commit(req_ids, rows)
        assert policies[1].counters == policies[0].counters
        for req_id in policies[0].slot_of:
            torch_state, host_state = (stored(p, req_id) for p in policies)
            for field in ("entropies", "count", "large", "stint"):
                assert getattr(host_state, field).tolist() == getattr(torch_state, field).tolist(), field
        if step % 7 == 6:
            for policy in policies:
                policy.forget(lambda r: r in req_ids)
