"""The goodput controller and the adaptive-draft config, against float64 references.

Step times here are synthetic: exact linear cost functions the tests choose, so the expected
decision can be computed by hand. Tests never time anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_adaptive.config import ConfigError
from vllm_adaptive.speculative.config import AdaptiveDraftConfig
from vllm_adaptive.speculative.controller import (
    GoodputController,
    LinearTimeModel,
    expected_accepted_length,
)

Cost = Callable[[int, int], float]


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6), min_size=1, max_size=4))
def test_expected_accepted_length_is_the_sum_of_prefix_products(rows: list[list[float]]) -> None:
    got = expected_accepted_length(torch.tensor(rows, dtype=torch.float64))
    for r, a in enumerate(rows):
        for k in range(7):
            reference = sum(math.prod(a[: i + 1]) for i in range(k))
            assert abs(got[r, k].item() - reference) <= 1e-12


def test_constant_acceptance_gives_the_geometric_series() -> None:
    # E[accepted | K] = a (1 - a^K) / (1 - a); for a = 0.8, K = 4: 2.3616.
    got = expected_accepted_length(torch.full((1, 4), 0.8))
    assert got[0].tolist() == pytest.approx([0.0, 0.8, 1.44, 1.952, 2.3616])


def test_time_model_recovers_exact_linear_costs() -> None:
    model = LinearTimeModel(2, forget=1.0)
    for b in (1, 2, 4, 8, 16):
        for k in (0, 1, 3):
            model.observe((b, b * (1 + k)), 0.01 + 0.002 * b + 0.0005 * b * (1 + k))
    torch.testing.assert_close(
        model.coefficients, torch.tensor([0.01, 0.002, 0.0005], dtype=torch.float64)
    )
    assert model.predict((32, 32 * 9)) == pytest.approx(0.01 + 0.064 + 0.144)


def test_a_feature_that_never_varied_is_taken_as_free() -> None:
    model = LinearTimeModel(2)
    for _ in range(10):
        model.observe((4, 20), 0.05)
    assert model.predict((4, 20)) == pytest.approx(0.05)
    assert model.predict((4, 400)) == pytest.approx(0.05, rel=1e-9)


def test_time_model_forgets_old_costs() -> None:
    model = LinearTimeModel(1, forget=0.8)
    for i in range(200):
        model.observe((float(i % 5),), 1.0 + 0.1 * (i % 5))  # old regime
    for i in range(200):
        model.observe((float(i % 5),), 2.0 + 0.3 * (i % 5))  # new regime
    assert model.predict((4.0,)) == pytest.approx(3.2, rel=1e-6)


def test_fitted_costs_are_never_negative() -> None:
    model = LinearTimeModel(1, forget=1.0)
    for x in range(5):
        model.observe((float(x),), 1.0 - 0.1 * x)  # measurement noise that looks like a saving
    assert (model.coefficients >= 0).all()


def train(controller: GoodputController, verify: Cost, draft: Cost) -> None:
    """Feed exact step times over a spread of batch sizes and draft lengths."""
    for rows in (1, 2, 4, 8, 16, 32):
        for k in (0, 1, 2, 4, 8):
            controller.observe_verify(rows, rows * (1 + k), verify(rows, rows * (1 + k)))
            passes = controller.draft_passes(k)
            controller.observe_draft(rows, passes, draft(rows, passes))


def reference_goodput(acceptance: float, rows: int, k: int, verify: Cost, draft: Cost) -> float:
    tokens = rows * (1.0 + sum(acceptance ** (i + 1) for i in range(k)))
    passes = max(k, 1)
    return tokens / (verify(rows, rows * (1 + k)) + draft(rows, passes))


def decide_until_settled(controller: GoodputController, acceptance: torch.Tensor) -> int:
    for _ in range(controller.patience + 1):
        k = controller.decide(acceptance)
    return k


def test_turns_speculation_off_when_verifying_extra_tokens_costs_more_than_it_gains() -> None:
    def verify(rows: int, tokens: int) -> float:
        return 0.01 + 0.004 * tokens  # every verified token costs 4 ms

    def draft(rows: int, passes: int) -> float:
        return 0.0005 * passes + 0.0001 * passes * rows

    controller = GoodputController(8, initial_k=4)
    train(controller, verify, draft)
    acceptance = torch.full((8, 8), 0.5)
    goodput = controller.expected_goodput(acceptance)
    for k in range(9):
        assert goodput[k].item() == pytest.approx(
            reference_goodput(0.5, 8, k, verify, draft), rel=1e-5
        )
    assert int(goodput.argmax()) == 0
    assert decide_until_settled(controller, acceptance) == 0


@pytest.mark.parametrize("rates", [[0.7], [0.3, 0.95, 0.0, 1.0, 0.6]], ids=["one-row", "rows"])
def test_goodput_from_per_request_rates_is_the_reference(rates: list[float]) -> None:
    """What the policy calls each step (one rate per request, the same at every position),
    against the plain-Python reference summed over the requests."""
    def verify(rows: int, tokens: int) -> float:
        return 0.01 + 0.001 * rows + 0.0005 * tokens

    def draft(rows: int, passes: int) -> float:
        return 0.002 * passes + 0.0001 * passes * rows

    controller = GoodputController(8, initial_k=4)
    train(controller, verify, draft)
    rows = len(rates)
    goodput = controller.expected_goodput_of_rates(np.array(rates))
    for k in range(9):
        tokens = sum(1.0 + sum(a ** (i + 1) for i in range(k)) for a in rates)
        reference = tokens / (verify(rows, rows * (1 + k)) + draft(rows, max(k, 1)))
        assert goodput[k] == pytest.approx(reference, rel=1e-5)


def test_drafts_long_when_acceptance_is_high_and_verification_is_cheap() -> None:
    def verify(rows: int, tokens: int) -> float:
        return 0.02 + 0.0001 * tokens  # memory-bound: extra tokens nearly free

    def draft(rows: int, passes: int) -> float:
        return 0.0005 * passes + 0.00005 * passes * rows

    controller = GoodputController(8, initial_k=1)
    train(controller, verify, draft)
    acceptance = torch.full((2, 8), 0.95)
    reference = [reference_goodput(0.95, 2, k, verify, draft) for k in range(9)]
    assert max(range(9), key=reference.__getitem__) == 8
    assert decide_until_settled(controller, acceptance) == 8


def test_the_best_k_moves_with_the_batch_size() -> None:
    # Verification is flat up to ~64 tokens, then every token costs: typical of a GPU.
    def verify(rows: int, tokens: int) -> float:
        return 0.02 + 0.0008 * max(tokens - 64, 0)

    def draft(rows: int, passes: int) -> float:
        return 0.001 * passes

    small, large = GoodputController(8, initial_k=4), GoodputController(8, initial_k=4)
    # A linear model cannot fit the kink, so give each controller the regime it serves.
    for controller, rows in ((small, 2), (large, 32)):
        for r in (rows, rows + 1, rows + 2):
            for k in (0, 1, 2, 4, 8):
                controller.observe_verify(r, r * (1 + k), verify(r, r * (1 + k)))
                passes = controller.draft_passes(k)
                controller.observe_draft(r, passes, draft(r, passes))
    acceptance = torch.full((2, 8), 0.8)
    assert decide_until_settled(small, acceptance) >= 4
    assert decide_until_settled(large, torch.full((32, 8), 0.8)) <= 1


def test_keeps_the_initial_k_until_it_has_measured_enough_steps() -> None:
    controller = GoodputController(8, initial_k=3, min_samples=8)
    for _ in range(7):
        controller.observe_verify(4, 4, 1.0)
        controller.observe_draft(4, 1, 1.0)
    assert controller.decide(torch.full((4, 8), 0.01)) == 3
    assert controller.decide(torch.zeros(0, 8)) == 3  # nothing to decide for an empty batch


def test_switches_only_after_patience_decisions_in_a_row() -> None:
    def verify(rows: int, tokens: int) -> float:
        return 0.01 + 0.004 * tokens

    def draft(rows: int, passes: int) -> float:
        return 0.001 * passes

    controller = GoodputController(8, initial_k=4, patience=3)
    train(controller, verify, draft)
    bad = torch.full((4, 8), 0.1)  # K = 0 is far better
    assert [controller.decide(bad) for _ in range(4)] == [4, 4, 0, 0]


def test_an_interrupted_streak_does_not_switch() -> None:
    def verify(rows: int, tokens: int) -> float:
        return 0.01 + 0.004 * tokens

    def draft(rows: int, passes: int) -> float:
        return 0.001 * passes

    controller = GoodputController(8, initial_k=4, patience=2, margin=0.05)
    train(controller, verify, draft)
    bad, good = torch.full((4, 8), 0.1), torch.full((4, 8), 1.0)
    # With acceptance 1, K = 8 is best; with 0.1, K = 0; the winner changes every step.
    assert [controller.decide(x) for x in (bad, good, bad, good, bad, good)] == [4] * 6


def test_does_not_move_for_a_gain_below_the_margin() -> None:
    def verify(rows: int, tokens: int) -> float:
        return 0.05 + 0.0002 * tokens

    def draft(rows: int, passes: int) -> float:
        return 0.002 * passes

    controller = GoodputController(8, initial_k=3, margin=0.5, patience=1)
    train(controller, verify, draft)
    acceptance = torch.full((4, 8), 0.7)
    goodput = controller.expected_goodput(acceptance)
    best = int(goodput.argmax())
    assert best != 3 and goodput[best] < 1.5 * goodput[3]
    assert controller.decide(acceptance) == 3


def test_no_speculation_still_pays_the_draft_pass_that_keeps_its_cache_in_step() -> None:
    with_pass, without = GoodputController(4), GoodputController(4, draft_runs_at_k0=False)
    for controller in (with_pass, without):
        for rows in (1, 2, 4):
            for passes in (1, 2, 3):
                controller.observe_draft(rows, passes, 0.01 * passes)
                controller.observe_verify(rows, rows * passes, 0.1)
    assert with_pass.step_seconds(4, 0) == pytest.approx(0.11)
    assert without.step_seconds(4, 0) == pytest.approx(0.1)
    assert with_pass.step_seconds(4, 3) == pytest.approx(0.13)


def test_controller_takes_its_parameters_from_the_config() -> None:
    config = AdaptiveDraftConfig(max_draft_tokens=6, controller_initial_k=2, controller_patience=5)
    controller = GoodputController.from_config(config)
    assert (controller.max_draft_tokens, controller.k, controller.patience) == (6, 2, 5)
    assert controller.margin == 0.05 and controller.min_samples == 8


# The config: validated once; each error names the key, the allowed range and the value.


def test_config_defaults_are_valid_and_off() -> None:
    config = AdaptiveDraftConfig()
    assert config.enabled is False and config.stop_rule == "specdec"
    assert (config.adaedl_gamma, config.adaedl_beta1, config.adaedl_beta2) == (0.2, 0.5, 0.9)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (
            {"entropy_threshold": -1.0},
            r"^entropy_threshold must be a number in \(0, inf\), got -1\.0$",
        ),
        ({"specdec_threshold": 1.0}, r"^specdec_threshold must be 'auto' or a number in \(0, 1\), got 1\.0$"),
        ({"adaedl_lambda": 2}, r"^adaedl_lambda must be a number in \[0, 1\], got 2$"),
        ({"calibration_decay": 0.0}, r"^calibration_decay must be a number in \(0, 1\], got 0\.0$"),
        (
            {"controller_margin": float("nan")},
            r"^controller_margin must be a number in \[0, 1\], got nan$",
        ),
        ({"adaedl_gamma": "0.2"}, r"^adaedl_gamma must be a number in \(0, inf\), got '0\.2'$"),
        ({"max_draft_tokens": 0}, r"^max_draft_tokens must be an integer in \[1, 128\], got 0$"),
        (
            {"max_draft_tokens": True},
            r"^max_draft_tokens must be an integer in \[1, 128\], got True$",
        ),
        (
            {"calibration_bins": 2.5},
            r"^calibration_bins must be an integer in \[1, 10000\], got 2\.5$",
        ),
        (
            {"max_draft_tokens": 4, "controller_initial_k": 6},
            r"^controller_initial_k must be an integer in \[0, max_draft_tokens=4\], got 6$",
        ),
        (
            {"stop_rule": "ada"},
            r"^stop_rule must be one of \['none', 'entropy', 'adaedl', 'specdec'\], got 'ada'$",
        ),
        (
            {"confidence": "max"},
            r"^confidence must be one of \['top_prob', 'token_prob'\], got 'max'$",
        ),
    ],
)
def test_bad_config_values_name_the_key_the_range_and_the_value(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        AdaptiveDraftConfig(**kwargs)
