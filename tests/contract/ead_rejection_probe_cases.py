"""The routing gate against vLLM's own `rejection_sample` on this machine (no engine).

EAD forces a position by turning the target's logits row into a one-hot on the draft token
(vllm_adaptive.routing.gate). These tests pin what that relies on in the installed vLLM (EAD.md
§10, fact 2): forced positions are accepted by the greedy kernel and by the random kernel, with
and without draft probabilities; unforced positions are verified as before; a position whose
draft token a constraint forbids (-inf) is verified, never forced; the bonus token follows only
a fully accepted draft, and the gate's dropped bonus leaves the placeholder -1. Expected outputs
are written out by hand from the kernels' definition (accept while the draft equals the target's
choice; the bonus after full acceptance).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm.v1.sample import rejection_sampler

from vllm_adaptive.routing.gate import RoutingGate, RoutingPlan, RowPlan, force_rows



@pytest.fixture(scope="module", autouse=True)
def platform_kernels() -> None:
    """What a vLLM worker does at start (worker_base.py): load the platform's kernels, and on the
    CPU build bind the rejection kernels to their C++ versions."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    current_platform.register_triton_kernel_overrides()


V = 10
# Two requests: drafts [3, 5] and [2]; the target's argmax is token 0 everywhere; bonus 7 and 6.
DRAFTS = [[3, 5], [2]]
BONUS = [7, 6]


def original() -> Any:
    function = rejection_sampler.rejection_sample
    return getattr(function, "__vllm_adaptive_original__", function)


def metadata(random: bool, seed: int = 0) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        all_greedy=not random, all_random=random,
        temperature=torch.full((len(DRAFTS),), 1.0 if random else 0.0),
        generators={0: generator, 1: torch.Generator().manual_seed(seed + 1)} if random else {},
    )


def inputs(random: bool, with_draft_probs: bool) -> dict[str, Any]:
    flat = [t for d in DRAFTS for t in d]
    logits = torch.full((len(flat), V), -4.0)
    logits[:, 0] = 8.0  # the target is sure of token 0 (probability ~1 - 1e-5)
    draft_probs = None
    if with_draft_probs:
        draft_probs = torch.full((len(flat), V), 0.01)
        for i, t in enumerate(flat):
            draft_probs[i, t] = 1.0 - 0.01 * (V - 1)
    counts = [len(d) for d in DRAFTS]
    return dict(
        draft_token_ids=torch.tensor(flat, dtype=torch.int32),
        num_draft_tokens=counts,
        max_spec_len=max(counts),
        cu_num_draft_tokens=torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32),
        draft_probs=draft_probs,
        target_logits=logits,
        bonus_token_ids=torch.tensor(BONUS, dtype=torch.int32).view(-1, 1),
        sampling_metadata=metadata(random),
    )


def sample(random: bool, with_draft_probs: bool, forced_flat: list[int],
           forbid: tuple[int, int] | None = None) -> list[list[int]]:
    args = inputs(random, with_draft_probs)
    if forbid is not None:
        args["target_logits"][forbid] = float("-inf")
    if forced_flat:
        args["target_logits"], _ = force_rows(
            args["target_logits"], args["draft_token_ids"], torch.tensor(forced_flat))
    return original()(**args).tolist()


CASES = [(False, False), (True, False), (True, True)]  # (random, with draft probabilities)


@pytest.mark.parametrize("random,with_draft_probs", CASES)
def test_unforced_positions_are_verified(random: bool, with_draft_probs: bool) -> None:
    # The target never agrees with the drafts: its choice (0) at the first position, no bonus.
    assert sample(random, with_draft_probs, []) == [[0, -1, -1], [0, -1, -1]]


@pytest.mark.parametrize("random,with_draft_probs", CASES)
def test_forced_positions_are_accepted_with_the_bonus_after_them(random: bool, with_draft_probs: bool) -> None:
    assert sample(random, with_draft_probs, [0, 1, 2]) == [[3, 5, 7], [2, 6, -1]]


@pytest.mark.parametrize("random,with_draft_probs", CASES)
def test_a_forced_prefix_then_verification(random: bool, with_draft_probs: bool) -> None:
    assert sample(random, with_draft_probs, [0]) == [[3, 0, -1], [0, -1, -1]]


@pytest.mark.parametrize("random,with_draft_probs", CASES)
def test_a_forbidden_draft_token_is_verified_not_forced(random: bool, with_draft_probs: bool) -> None:
    # Token 5 at row 0's second position is masked (-inf, a constraint): forcing it is vetoed.
    assert sample(random, with_draft_probs, [0, 1, 2], forbid=(1, 5)) == [[3, 0, -1], [2, 6, -1]]


def test_force_rows_reports_vetoes_and_leaves_the_input_untouched() -> None:
    args = inputs(False, False)
    before = args["target_logits"].clone()
    args["target_logits"][1, 5] = float("-inf")
    before[1, 5] = float("-inf")
    forced, allowed = force_rows(args["target_logits"], args["draft_token_ids"], torch.tensor([0, 1]))
    assert allowed.tolist() == [True, False]
    assert torch.equal(args["target_logits"], before)
    assert forced[0].tolist() == [float("-inf")] * 3 + [0.0] + [float("-inf")] * 6
    assert torch.equal(forced[1], before[1]) and torch.equal(forced[2], before[2])


class Batch:
    def __init__(self, req_ids: list[str], spec_token_ids: list[list[int]]) -> None:
        self.req_ids = req_ids
        self.spec_token_ids = spec_token_ids


class Runner:  # what the gate reads of vLLM's model runner
    def __init__(self, batch: Batch) -> None:
        self.input_batch = batch


@pytest.mark.parametrize("random", [False, True])
def test_gate_forces_matched_rows_drops_planned_bonuses_and_leaves_a_receipt(random: bool) -> None:
    runner = Runner(Batch(["a", "b"], [[3, 5], [2]]))
    gate = RoutingGate(runner)
    gate.arm(RoutingPlan(7, {"a": RowPlan((3, 5), (True, True), drop_bonus=True),
                             "b": RowPlan((2, 9), (True, True), drop_bonus=False)}))
    out = gate.rejection_sample(original(), **inputs(random, False)).tolist()
    # a: both forced, bonus dropped; b: its scheduled draft [2] is a prefix of the plan: forced,
    # and its bonus kept (the plan was trimmed).
    assert out == [[3, 5, -1], [2, 6, -1]]
    receipt = gate.take_receipt()
    assert receipt is not None and receipt.step == 7
    assert receipt.matched == [True, True] and receipt.bonus_dropped == [True, False]
    assert receipt.forced.tolist() == [True, True, True] and receipt.vetoed.tolist() == [False] * 3
    assert gate.take_receipt() is None


def test_gate_verifies_rows_whose_draft_is_not_the_planned_one() -> None:
    runner = Runner(Batch(["a", "b"], [[3, 5], [2]]))
    gate = RoutingGate(runner)
    gate.arm(RoutingPlan(1, {"a": RowPlan((3, 4), (True, True), drop_bonus=True)}))
    out = gate.rejection_sample(original(), **inputs(False, False)).tolist()
    assert out == [[0, -1, -1], [0, -1, -1]]
    receipt = gate.take_receipt()
    assert receipt is not None and receipt.matched == [False, False]
    assert gate.counters.mismatched_rows == 1


def test_without_a_plan_the_gate_is_vllms_function() -> None:
    runner = Runner(Batch(["a", "b"], [[3, 5], [2]]))
    gate = RoutingGate(runner)
    assert gate.rejection_sample(original(), **inputs(False, False)).tolist() == [[0, -1, -1], [0, -1, -1]]
    receipt = gate.take_receipt()
    assert receipt is not None and receipt.step is None and receipt.forced is None
