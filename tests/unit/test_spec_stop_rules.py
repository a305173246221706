"""Stop rules for adaptive draft length, against float64 definitions and hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_adaptive.speculative.config import AdaptiveDraftConfig
from vllm_adaptive.speculative.stop_rules import (
    AcceptanceCalibrator,
    AdaEDLStopRule,
    DraftState,
    EntropyStopRule,
    NoStopRule,
    SpecDecStopRule,
    StopRule,
    build_calibrator,
    build_stop_rule,
    draft_stats,
    draft_stats_from_probs,
    host_draft_stats,
    verification_outcomes,
)

NEG_INF = float("-inf")


def reference_stats(
    logits: torch.Tensor, token_ids: torch.Tensor
) -> tuple[list[float], list[float], list[float]]:
    """(entropy nats, top probability, drafted token's probability) per row, float64."""
    x = logits.double()
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
    p = logp.exp()
    entropy = -torch.where(x > NEG_INF, p * logp, 0.0).sum(dim=-1)
    top = p.max(dim=-1).values
    token = p.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return entropy.tolist(), top.tolist(), token.tolist()


def close(a: float, b: float, tol: float = 2e-5) -> bool:
    return abs(a - b) <= tol * (1.0 + abs(b))


# A near one-hot row (H ~ 4e-5 nats, top 0.99999) and a flat row over 1000 tokens (H = ln 1000).
PEAKED_AND_FLAT = torch.stack(
    [torch.cat([torch.tensor([20.0]), torch.zeros(999)]), torch.zeros(1000)]
)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 5),
    vocab=st.integers(1, 300),
    scale=st.floats(0.1, 20.0),
    masked=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**31 - 1),
    from_probs=st.booleans(),
    greedy=st.booleans(),
)
def test_draft_stats_match_the_float64_definitions(
    rows: int, vocab: int, scale: float, masked: float, seed: int, from_probs: bool, greedy: bool
) -> None:
    """The torch statistics and the policy's numpy ones (small float32 matrices, its CPU path),
    from logits or from probabilities, greedy (token = argmax) or sampled."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * scale
    logits[torch.rand(rows, vocab, generator=g) < masked] = NEG_INF
    logits[:, 0] = logits[:, 0].clamp(min=-1e4)  # at least one finite token per row
    finite = logits > NEG_INF
    token_ids = logits.argmax(dim=-1) if greedy else torch.multinomial(finite.float(), 1, generator=g).squeeze(-1)
    passed = None if greedy and not from_probs else token_ids
    if from_probs:
        probs = torch.softmax(logits, dim=-1)
        computed = [draft_stats_from_probs(probs, passed), host_draft_stats(logits, passed, probs=probs)]
    else:
        computed = [draft_stats(logits, passed), host_draft_stats(logits, passed)]
    entropy, top, token = reference_stats(logits, token_ids)
    for stats in computed:
        assert stats.entropy is not None
        for r in range(rows):
            assert close(float(stats.entropy[r]), entropy[r], 1e-4), (r, stats.entropy[r], entropy[r])
            assert close(float(stats.top_prob[r]), top[r])
            assert close(float(stats.token_prob[r]), token[r])
        assert all(x.dtype in (torch.float32, np.float32) for x in stats)
        assert (stats.entropy >= 0).all()


@pytest.mark.parametrize("case", ["large", "bfloat16", "no finite logit"])
def test_host_draft_stats_hand_other_inputs_to_the_torch_reductions(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_adaptive.speculative import stop_rules

    calls = []
    torch_stats = stop_rules.draft_stats
    monkeypatch.setattr(stop_rules, "draft_stats", lambda *a, **k: calls.append(1) or torch_stats(*a, **k))
    logits = torch.randn(2, 40)
    if case == "large":
        monkeypatch.setattr(stop_rules, "HOST_STATS_MAX_ELEMENTS", 79)
    elif case == "bfloat16":
        logits = logits.bfloat16()
    else:
        logits[1] = NEG_INF
    stats = host_draft_stats(logits, entropy=False)
    assert calls == [1] and stats.entropy is None
    expected = torch_stats(logits, entropy=False)
    np.testing.assert_array_equal(stats.top_prob, expected.top_prob.numpy())  # NaN where no logit
    host = host_draft_stats(torch.randn(1, 40), entropy=False)  # small float32: numpy, no torch call
    assert calls == [1] and host.top_prob.shape == (1,)


def test_stats_from_probabilities_equal_stats_from_logits() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, NEG_INF], [0.0, 0.0, 0.0, 0.0]])
    token_ids = torch.tensor([1, 3])
    a = draft_stats(logits, token_ids)
    b = draft_stats_from_probs(torch.softmax(logits, dim=-1), token_ids)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    # Uniform over 4: H = ln 4, every probability 1/4.
    assert close(b.entropy[1].item(), math.log(4.0)) and close(b.top_prob[1].item(), 0.25)


def test_greedy_drafts_use_the_top_probability_as_the_token_probability() -> None:
    stats = draft_stats(torch.tensor([[3.0, 1.0, 0.0]]))
    assert torch.equal(stats.token_prob, stats.top_prob)
    assert close(stats.top_prob.item(), math.exp(3.0) / (math.exp(3.0) + math.e + 1.0))


def test_bad_token_ids_are_named() -> None:
    with pytest.raises(ValueError, match=r"token_ids must be int32/int64 of shape \[2\]"):
        draft_stats(torch.zeros(2, 5), torch.tensor([1.0, 2.0]))


def test_entropy_rule_stops_above_its_threshold_in_nats() -> None:
    # ln 8 = 2.079 > 2.0 stops; ln 7 = 1.946 does not.
    logits = torch.full((2, 8), 0.0)
    logits[1, 7] = NEG_INF
    rule = EntropyStopRule(threshold=2.0)
    decision = rule(draft_stats(logits), DraftState.start(2))
    assert decision.stop.tolist() == [True, False]
    assert decision.keep.tolist() == [True, True]  # stop after the token
    assert close(decision.score[0].item(), math.log(8.0)) and close(
        decision.score[1].item(), math.log(7.0)
    )
    dropping = EntropyStopRule(threshold=2.0, keep_stopping_token=False)(
        draft_stats(logits), DraftState.start(2)
    )
    assert dropping.keep.tolist() == [False, True]  # the uncertain token itself is dropped


def test_adaedl_bound_is_one_minus_sqrt_gamma_entropy() -> None:
    # Two equal tokens: H = ln 2, bound = 1 - sqrt(0.2 ln 2) = 0.627670.
    stats = draft_stats(torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    rule = AdaEDLStopRule(gamma=0.2)
    decision = rule(stats, DraftState.start(2, lam=torch.tensor([0.6, 0.7])))
    expected = 1.0 - math.sqrt(0.2 * math.log(2.0))
    assert close(decision.score[0].item(), expected) and abs(expected - 0.627670) < 1e-6
    assert decision.stop.tolist() == [False, True]  # only the row whose lambda is above the bound


@settings(max_examples=40, deadline=None)
@given(
    entropy=st.lists(st.floats(0.0, 12.0), min_size=1, max_size=8),
    gamma=st.floats(0.01, 2.0),
    lam=st.floats(0.0, 1.0),
)
def test_adaedl_decision_matches_the_float64_bound(
    entropy: list[float], gamma: float, lam: float
) -> None:
    h = torch.tensor(entropy)
    stats = draft_stats(torch.zeros(len(entropy), 2))._replace(entropy=h)
    decision = AdaEDLStopRule(gamma=gamma, lam=lam)(stats, DraftState.start(len(entropy), lam=lam))
    for r, value in enumerate(entropy):
        bound = 1.0 - math.sqrt(gamma * float(h[r]))
        assert close(decision.score[r].item(), bound, 1e-6)
        if abs(bound - lam) > 1e-5:
            assert decision.stop[r].item() == (bound < lam)


def adaedl_algorithm_1(
    lam: float, ar: float, drafted: int, accepted: int, max_draft: int
) -> tuple[float, float]:
    """Algorithm 1 for one request, float64: the reference for update_lambda."""
    if drafted == 0:
        return lam, ar
    ar = 0.5 * ar + 0.5 * accepted / drafted
    if ar < 0.9:
        proposal = lam + 0.01
    elif accepted != max_draft:
        proposal = lam - 0.01
    else:
        proposal = lam
    return min(1.0, max(0.0, 0.9 * lam + 0.1 * proposal)), ar


@settings(max_examples=40, deadline=None)
@given(rounds=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=30))
def test_adaedl_lambda_follows_algorithm_1(rounds: list[tuple[int, int]]) -> None:
    rule = AdaEDLStopRule()
    lam, ema = torch.tensor([0.7]), torch.tensor([0.9])
    ref_lam, ref_ar = 0.7, 0.9
    for drafted, accepted in rounds:
        accepted = min(accepted, drafted)
        lam, ema = rule.update_lambda(
            lam, ema, torch.tensor([drafted]), torch.tensor([accepted]), 6
        )
        ref_lam, ref_ar = adaedl_algorithm_1(ref_lam, ref_ar, drafted, accepted, 6)
        assert close(lam.item(), ref_lam, 1e-5) and close(ema.item(), ref_ar, 1e-5)


def test_adaedl_lambda_moves_by_hand() -> None:
    rule = AdaEDLStopRule()
    # Row 0: 1 of 4 accepted -> AR 0.575 < 0.9 -> lambda 0.9 * 0.7 + 0.1 * 0.71 = 0.701.
    # Row 1: 8 of 8 (the cap) -> AR 0.95 -> lambda kept. Row 2: 5 of 5 under cap 8 -> 0.699.
    # Row 3: drafted nothing -> unchanged.
    lam, ema = rule.update_lambda(
        torch.full((4,), 0.7),
        torch.full((4,), 0.9),
        torch.tensor([4, 8, 5, 0]),
        torch.tensor([1, 8, 5, 0]),
        8,
    )
    torch.testing.assert_close(lam, torch.tensor([0.701, 0.7, 0.699, 0.7]))
    torch.testing.assert_close(ema, torch.tensor([0.575, 0.95, 0.95, 0.9]))
    still, _ = AdaEDLStopRule(adapt=False).update_lambda(
        torch.full((1,), 0.7), torch.full((1,), 0.9), torch.tensor([4]), torch.tensor([0]), 8
    )
    assert still.item() == pytest.approx(0.7)


@settings(max_examples=40, deadline=None)
@given(
    confidences=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    threshold=st.floats(0.05, 0.95),
    seed=st.integers(0, 1000),
)
def test_specdec_rule_stops_when_one_minus_the_product_exceeds_theta(
    confidences: list[float], threshold: float, seed: int
) -> None:
    calibrator = AcceptanceCalibrator(num_bins=10)
    g = torch.Generator().manual_seed(seed)
    calibrator.update(torch.rand(500, generator=g), torch.rand(500, generator=g) < 0.6)
    rule = SpecDecStopRule(threshold=threshold, calibrator=calibrator)
    table = calibrator.estimates().tolist()
    state = DraftState.start(1)
    survival = 1.0
    for c in confidences:
        stats = draft_stats(torch.zeros(1, 2))._replace(top_prob=torch.tensor([c]))
        decision = rule(stats, state)
        state = decision.state
        c32 = float(torch.tensor(c, dtype=torch.float32))  # the rule sees float32 (0.7 -> bin 6)
        survival *= table[min(int(c32 * 10), 9)]
        assert close(decision.score.item(), 1.0 - survival, 1e-5)
        assert decision.keep.item()  # SpecDec++ stops after the token, never drops it
        if abs((1.0 - survival) - threshold) > 1e-5:
            assert decision.stop.item() == (1.0 - survival > threshold)
        if decision.stop.item():
            break


def test_specdec_rule_can_calibrate_the_drafted_tokens_probability() -> None:
    calibrator = AcceptanceCalibrator(num_bins=2)
    rule = SpecDecStopRule(threshold=0.5, calibrator=calibrator, confidence="token_prob")
    # top 0.9 but the drawn token has 0.1: a = centre of bin 0 = 0.25, 1 - 0.25 > 0.5.
    stats = draft_stats(torch.zeros(1, 2))._replace(
        top_prob=torch.tensor([0.9]), token_prob=torch.tensor([0.1])
    )
    assert rule(stats, DraftState.start(1)).stop.item()


# The rule matrix: every rule, with the peaked row drafted on and the flat row stopped.
# A new rule is tested by adding one line.
RULES = [
    ("none", lambda cal: NoStopRule(), [False, False]),
    ("entropy", lambda cal: EntropyStopRule(threshold=2.0), [False, True]),
    ("adaedl", lambda cal: AdaEDLStopRule(), [False, True]),
    ("specdec", lambda cal: SpecDecStopRule(threshold=0.7, calibrator=cal), [False, True]),
]


@pytest.mark.parametrize(("name", "make", "expected"), RULES, ids=[r[0] for r in RULES])
def test_every_rule_drafts_on_confident_rows_and_stops_flat_ones(
    name: str, make: Callable[[AcceptanceCalibrator], StopRule], expected: list[bool]
) -> None:
    rule = make(AcceptanceCalibrator())
    assert rule.name == name
    state = DraftState.start(2, lam=0.7)
    decision = rule(draft_stats(PEAKED_AND_FLAT), state)
    assert decision.stop.tolist() == expected
    assert decision.stop.dtype == torch.bool and decision.keep.dtype == torch.bool
    assert not decision.score.isnan().any()
    # A single possible token (H = 0) is the most confident case: no rule stops there.
    single = draft_stats(torch.tensor([[0.0, NEG_INF, NEG_INF]]))
    assert not rule(single, DraftState.start(1, lam=0.7)).stop.item()


@pytest.mark.parametrize("name", ["none", "entropy", "adaedl", "specdec"])
def test_the_config_names_the_rule(name: str) -> None:
    config = AdaptiveDraftConfig(stop_rule=name)
    rule = build_stop_rule(config, build_calibrator(config))
    assert rule.name == name


def test_verification_observes_the_accepted_prefix_and_the_first_rejection_only() -> None:
    observed, accepted = verification_outcomes(
        torch.tensor([3, 3, 0, 2]), torch.tensor([3, 1, 0, 0]), 4
    )
    assert observed.tolist() == [
        [True, True, True, False],  # all 3 accepted; nothing at position 3
        [True, True, False, False],  # accepted, then rejected; position 2 never tested
        [False, False, False, False],  # no draft
        [True, False, False, False],  # rejected at once
    ]
    assert accepted.tolist() == [
        [True, True, True, False],
        [True, False, False, False],
        [False, False, False, False],
        [False, False, False, False],
    ]


def test_calibrator_starts_at_the_bin_centres() -> None:
    calibrator = AcceptanceCalibrator(num_bins=4)
    assert calibrator.estimates().tolist() == [0.125, 0.375, 0.625, 0.875]
    a = calibrator.acceptance(torch.tensor([0.0, 0.3, 0.999, 1.0, 1.5]))
    assert a.dtype == torch.float32 and a.tolist() == [0.125, 0.375, 0.875, 0.875, 0.875]


def test_calibrator_counts_pseudo_observations_and_data() -> None:
    calibrator = AcceptanceCalibrator(num_bins=2, prior=2.0)
    calibrator.update(torch.tensor([0.9, 0.8, 0.7, 0.1]), torch.tensor([True, True, False, False]))
    # Bin 1: (2 * 0.75 + 2) / (2 + 3) = 0.7; bin 0: (2 * 0.25 + 0) / (2 + 1) = 1/6.
    torch.testing.assert_close(
        calibrator.estimates(), torch.tensor([1 / 6, 0.7], dtype=torch.float64)
    )


def test_calibrator_converges_to_a_known_acceptance_rate() -> None:
    # Acceptance 0.2 + 0.6 * c: linear, so each bin's true rate is the rate at its centre.
    g = torch.Generator().manual_seed(0)
    calibrator = AcceptanceCalibrator(num_bins=10)
    for _ in range(20):
        c = torch.rand(10_000, generator=g)
        calibrator.update(c, torch.rand(10_000, generator=g) < 0.2 + 0.6 * c)
    truth = 0.2 + 0.6 * calibrator.centres
    assert (calibrator.estimates() - truth).abs().max() < 0.02  # ~20k samples per bin: sd 0.003


def test_forgetting_tracks_a_change_in_acceptance() -> None:
    g = torch.Generator().manual_seed(1)
    forgetting, remembering = (
        AcceptanceCalibrator(num_bins=1, decay=0.9),
        AcceptanceCalibrator(num_bins=1),
    )
    for rate in (0.9, 0.3):
        for _ in range(60):
            c = torch.full((200,), 0.5)
            hit = torch.rand(200, generator=g) < rate
            forgetting.update(c, hit)
            remembering.update(c, hit)
    assert abs(forgetting.estimates().item() - 0.3) < 0.03
    assert abs(remembering.estimates().item() - 0.6) < 0.03  # the mean of both regimes


def test_calibrator_is_deterministic_and_its_state_size_is_fixed() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [(torch.rand(777, generator=g), torch.rand(777, generator=g) < 0.5) for _ in range(5)]
    a, b = AcceptanceCalibrator(decay=0.99), AcceptanceCalibrator(decay=0.99)
    for c, hit in batches:
        a.update(c, hit)
        b.update(c, hit)
    assert np.array_equal(a.observed, b.observed) and np.array_equal(a.accepted, b.accepted)
    assert a.observed.shape == (20,) and a.accepted.shape == (20,)


def test_calibrator_learns_only_from_observed_draft_positions() -> None:
    calibrator = AcceptanceCalibrator(num_bins=1)
    # Draft of 4 with 1 accepted: one acceptance and one rejection; 2 positions censored.
    calibrator.update_from_verification(
        torch.full((1, 4), 0.5), torch.tensor([4]), torch.tensor([1])
    )
    assert calibrator.observed.item() == 2.0 and calibrator.accepted.item() == 1.0


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: EntropyStopRule(threshold=0.0), r"threshold must be > 0 nats"),
        (lambda: AdaEDLStopRule(lam=1.5), r"lam out of range, got 1\.5"),
        (
            lambda: SpecDecStopRule(threshold=1.0, calibrator=AcceptanceCalibrator()),
            r"threshold must be in \(0, 1\)",
        ),
        (
            lambda: SpecDecStopRule(
                threshold=0.5, calibrator=AcceptanceCalibrator(), confidence="max"
            ),
            r"'max'",
        ),
        (lambda: AcceptanceCalibrator(num_bins=0), r"num_bins must be an integer >= 1, got 0"),
        (lambda: AcceptanceCalibrator(decay=0.0), r"decay must be in \(0, 1\], got 0\.0"),
    ],
)
def test_bad_rule_parameters_are_named(make: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()
