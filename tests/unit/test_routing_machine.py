"""EAD's switching machine (vllm_adaptive.routing.machine): `switch_step` on batches of rows
against `ReferenceMachine`, the plain-Python rule, one per row, on scripted sequences.

Every test runs on both array backends the machine accepts: torch tensors (the device path)
and numpy arrays (the host path a CPU engine uses); the two torch-only tests say so."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from vllm_adaptive.routing.machine import (
    ReferenceMachine,
    SwitchParams,
    SwitchState,
    select_snapshots,
    switch_step,
    window_mean,
)

TIE_MARGIN = 1e-6
BACKEND = "torch"  # set per test by the `backend` fixture: "torch" or "numpy"


@pytest.fixture(params=["torch", "numpy"], autouse=True)
def backend(request: pytest.FixtureRequest) -> str:
    global BACKEND
    BACKEND = request.param
    return request.param


def arr(values: Sequence, dtype: str | None = None) -> torch.Tensor | np.ndarray:
    """`values` as an array of the test's backend ("float64", "int64", "bool"; None: inferred)."""
    if BACKEND == "numpy":
        return np.array(values, dtype=dtype)
    return torch.tensor(values, dtype=None if dtype is None else getattr(torch, dtype))


def start(num_rows: int, max_window: int) -> SwitchState:
    return SwitchState.start(num_rows, max_window, "cpu", host=BACKEND == "numpy")


def params_of(tau: Sequence, window: Sequence, min_stint: Sequence, max_window: int = 64) -> SwitchParams:
    return SwitchParams.from_lists(tau, window, min_stint, "cpu", max_window=max_window, host=BACKEND == "numpy")


def dtype_name(a: torch.Tensor | np.ndarray) -> str:
    return str(a.dtype).removeprefix("torch.")


def on_backend(state: SwitchState) -> bool:
    """Every field is an array of the test's backend."""
    kind = np.ndarray if BACKEND == "numpy" else torch.Tensor
    return all(isinstance(x, kind) for x in (state.entropies, state.count, state.large, state.stint))


def assert_matches(state: SwitchState, refs: Sequence[ReferenceMachine]) -> None:
    """Every row of `state` is its reference's state: mode, stint, entries pushed (capped at
    max_window), the newest entries, and the window mean."""
    width = state.max_window
    assert dtype_name(state.entropies) == "float64" and on_backend(state)
    assert state.large.tolist() == [r.large for r in refs]
    assert state.stint.tolist() == [r.stint for r in refs]
    assert state.count.tolist() == [min(len(r.history), width) for r in refs]
    window = arr([r.window for r in refs], "int64")
    means = window_mean(state.entropies, state.count, window).tolist()
    for row, ref in enumerate(refs):
        kept = ref.history[-width:]
        if kept:
            assert state.entropies[row, width - len(kept):].tolist() == kept
            assert means[row] == pytest.approx(ref.mean(), abs=1e-12)


def run_batch(
    tau: Sequence[float],
    window: Sequence[int],
    min_stint: Sequence[int],
    entropies: Sequence[Sequence[float]],
    active: Sequence[Sequence[bool]] | None = None,
    max_window: int = 8,
) -> tuple[list[list[bool]], list[ReferenceMachine]]:
    """Steps the batch through `entropies` ([positions][rows]) and checks owners and state
    against one ReferenceMachine per row at every position; returns the owners [positions][rows]
    (the reference's) and the references."""
    params = params_of(tau, window, min_stint, max_window=max_window)
    refs = [ReferenceMachine(t, w, d) for t, w, d in zip(tau, window, min_stint)]
    state = start(len(refs), max_window)
    owners = []
    for position, row_entropies in enumerate(entropies):
        mask = [True] * len(refs) if active is None else list(active[position])
        expected = [ref.step(h) if on else ref.large
                    for ref, h, on in zip(refs, row_entropies, mask)]
        before = state.clone()
        state, owner = switch_step(
            state, params, arr(row_entropies, "float64"),
            None if active is None else arr(mask, "bool"))
        assert dtype_name(owner) == "bool"
        assert owner.tolist() == expected, f"position {position}"
        assert_matches(state, refs)
        for row, on in enumerate(mask):
            if not on:
                index = arr([row])
                assert states_equal(state.select(index), before.select(index))
        owners.append(expected)
    return owners, refs


def column(owners: list[list[bool]], row: int = 0) -> list[bool]:
    return [step[row] for step in owners]


def states_equal(a: SwitchState, b: SwitchState) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) and type(x) is type(y) for x, y in ((a.entropies, b.entropies), (a.count, b.count),
                                              (a.large, b.large), (a.stint, b.stint)))


def away_from_ties(
    rng: random.Random, tau: Sequence[float], window: Sequence[int], min_stint: Sequence[int],
    positions: int, low: float, high: float,
) -> list[list[float]]:
    """Seeded uniform entropies in [low, high) whose window means all stay TIE_MARGIN away from
    tau (regenerated until they do)."""
    while True:
        entropies = [[rng.uniform(low, high) for _ in tau] for _ in range(positions)]
        refs = [ReferenceMachine(t, w, d) for t, w, d in zip(tau, window, min_stint)]
        tied = False
        for row_entropies in entropies:
            for ref, h in zip(refs, row_entropies):
                ref.step(h)
                tied |= abs(ref.mean() - ref.tau) <= TIE_MARGIN
        if not tied:
            return entropies


def test_reference_hysteresis_by_hand() -> None:
    # tau 1, w 1, d 3: each switch waits until the mode has written 3 positions.
    ref = ReferenceMachine(tau=1.0, window=1, min_stint=3)
    owners = [ref.step(h) for h in [2, 2, 2, 2, 0, 0, 0, 0, 0]]
    assert owners == [False, False, False, True, True, True, False, False, False]
    # d 0: every position goes to the side of tau its entropy is on.
    ref = ReferenceMachine(tau=1.0, window=1, min_stint=0)
    assert [ref.step(h) for h in [2, 0, 2, 0]] == [True, False, True, False]


@pytest.mark.parametrize("min_stint", [0, 1, 2, 3, 5])
def test_hysteresis_small_to_large_and_back(min_stint: int) -> None:
    sequence = [2.0] * 8 + [0.0] * 8 + [2.0] * 8
    owners, _ = run_batch([1.0], [1], [min_stint], [[h] for h in sequence])
    owned = column(owners)
    # S -> L at the first high position where c >= d (c counts SMALL's positions from 0).
    first_large = owned.index(True)
    assert first_large == min_stint
    # L -> S waits until LARGE has written d positions.
    assert owned[8:].index(False) + 8 == max(8, first_large + min_stint)


def test_blip_within_min_stint_does_not_switch() -> None:
    sequence = [2.0, 2.0, 0.0, 2.0, 2.0, 0.0, 0.0, 0.0, 2.0]
    owners, _ = run_batch([1.0, 1.0], [1, 1], [0, 4], [[h, h] for h in sequence])
    assert column(owners, 0) == [True, True, False, True, True, False, False, False, True]
    assert column(owners, 1) == [False, False, False, False, True, True, True, True, True]


def test_mean_equal_to_tau_is_small() -> None:
    # Means of 1.5 (exact in binary) at positions 1, 4 and 6: m <= tau belongs to SMALL, both
    # when LARGE may switch back and when SMALL may switch.
    sequence = [2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0]
    owners, _ = run_batch([1.5], [2], [0], [[h] for h in sequence])
    assert column(owners) == [True, False, False, False, False, True, False]


def test_partial_windows() -> None:
    # w 4 of max_window 8: the first positions average over the 1, 2, 3 entries pushed (not
    # over zeros of the unfilled window), later ones over the last 4 only.
    sequence = [2.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 0.5, 0.5, 0.5, 0.5]
    owners, refs = run_batch([1.4] * 4, [1, 2, 3, 4], [0] * 4, [[h] * 4 for h in sequence])
    assert column(owners, 3)[:3] == [True, True, False]  # means 2, 1.5, 4/3
    assert refs[3].mean() == pytest.approx(0.5)
    # One wide window past max_window's cap on count: the count stays at max_window.
    run_batch([1.4], [8], [1], [[h] for h in sequence * 2], max_window=8)


def test_per_request_parameters_random_batch() -> None:
    rng = random.Random(2502_06833)
    tau = [0.5, 1.0, 1.5, 2.0, 2.5, 1.25]
    window = [1, 2, 3, 5, 8, 4]
    min_stint = [0, 1, 2, 3, 0, 6]
    entropies = away_from_ties(rng, tau, window, min_stint, positions=48, low=0.0, high=3.5)
    owners, _ = run_batch(tau, window, min_stint, entropies, max_window=8)
    # The sequence exercises both modes in most rows.
    assert sum(len(set(column(owners, row))) == 2 for row in range(len(tau))) >= 4


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_against_reference(seed: int) -> None:
    rng = random.Random(seed)
    rows = 7
    tau = [rng.uniform(0.5, 3.0) for _ in range(rows)]
    window = [rng.randint(1, 6) for _ in range(rows)]
    min_stint = [rng.randint(0, 4) for _ in range(rows)]
    entropies = away_from_ties(rng, tau, window, min_stint, positions=60, low=0.0, high=4.0)
    run_batch(tau, window, min_stint, entropies, max_window=6)


@pytest.mark.parametrize("min_stint", [0, 2])
def test_tau_below_or_above_every_entropy(min_stint: int) -> None:
    rng = random.Random(7)
    entropies = [[rng.uniform(0.5, 5.0) for _ in range(4)] for _ in range(40)]
    window = [1, 2, 3, 4]
    below, _ = run_batch([0.1] * 4, window, [min_stint] * 4, entropies)
    above, _ = run_batch([6.0] * 4, window, [min_stint] * 4, entropies)
    assert all(not owner for step in above for owner in step)
    if min_stint == 0:
        assert all(owner for step in below for owner in step)
    else:  # SMALL keeps the first d positions, then LARGE for good.
        assert all(step == [i >= min_stint] * 4 for i, step in enumerate(below))


def test_float32_entropies_are_widened() -> None:
    params = params_of([1.0], [2], [0])
    h = arr([1.5], "float32")
    state, owner = switch_step(start(1, 4), params, h)
    assert dtype_name(state.entropies) == "float64" and owner.tolist() == [True]


def test_inactive_rows_keep_their_state() -> None:
    rng = random.Random(11)
    tau = [1.0, 1.5, 2.0, 0.75, 1.25]
    window = [1, 3, 2, 4, 2]
    min_stint = [0, 1, 2, 0, 3]
    entropies = away_from_ties(rng, tau, window, min_stint, positions=40, low=0.0, high=3.0)
    active = [[rng.random() < 0.6 for _ in tau] for _ in entropies]
    active[0] = [False] * len(tau)  # a step no row takes
    run_batch(tau, window, min_stint, entropies, active=active)


def stepped_state(
    rows: int = 5, steps: int = 12, seed: int = 3
) -> tuple[SwitchState, SwitchParams]:
    """A batch after `steps` random positions (max_window 4)."""
    rng = random.Random(seed)
    params = params_of(
        [1.0 + 0.2 * r for r in range(rows)], [1 + r % 3 for r in range(rows)],
        [r % 2 for r in range(rows)], max_window=4)
    state = start(rows, 4)
    for _ in range(steps):
        h = arr([rng.uniform(0.0, 3.0) for _ in range(rows)], "float64")
        state, _ = switch_step(state, params, h)
    return state, params


def test_clone_is_independent() -> None:
    state, _ = stepped_state()
    copy = state.clone()
    copy.entropies += 1.0
    copy.count += 1
    copy.large ^= True
    copy.stint += 1
    assert not np.array_equal(np.asarray(copy.entropies), np.asarray(state.entropies))
    assert states_equal(state, stepped_state()[0])


def test_select_then_step_equals_step_then_select() -> None:
    state, params = stepped_state()
    rows = arr([3, 0, 4], "int64")
    h = arr([0.2, 2.9, 1.3, 0.1, 2.2], "float64")
    full, full_owner = switch_step(state, params, h)
    part, part_owner = switch_step(state.select(rows), params.select(rows), h[rows])
    assert states_equal(part, full.select(rows))
    assert part_owner.tolist() == full_owner[rows].tolist()


def test_where() -> None:
    a, _ = stepped_state(seed=1)
    b, _ = stepped_state(seed=2)
    mask = arr([True, False, False, True, False])
    mixed = a.where(mask, b)
    for row, take_a in enumerate(mask.tolist()):
        index = arr([row])
        assert states_equal(mixed.select(index), (a if take_a else b).select(index))
    assert states_equal(a.where(arr([True] * 5), b), a)
    assert states_equal(a.where(arr([False] * 5), b), b)


def test_assign_and_cat_round_trip() -> None:
    state, _ = stepped_state()
    rows = arr([4, 1], "int64")
    target = start(5, 4)
    target.assign(rows, state.select(rows))
    assert states_equal(target.select(rows), state.select(rows))
    untouched = arr([0, 2, 3])
    assert states_equal(target.select(untouched), start(3, 4))
    target.assign(untouched, state.select(untouched))
    assert states_equal(target, state)
    parts = [state.select(arr([0, 1])), state.select(arr([2])), state.select(arr([3, 4]))]
    assert states_equal(SwitchState.cat(parts), state)
    with pytest.raises(ValueError, match="max_window"):
        SwitchState.cat([state, start(1, 5)])
    other = SwitchState.start(1, 4, "cpu", host=BACKEND != "numpy")
    with pytest.raises(ValueError, match="mix numpy"):
        SwitchState.cat([state, other])


def test_select_snapshots() -> None:
    rng = random.Random(5)
    tau = [1.0, 1.5, 0.5, 2.0, 1.25, 0.9]
    window = [2, 1, 3, 4, 2, 1]
    min_stint = [1, 0, 2, 0, 3, 1]
    steps = 9
    entropies = away_from_ties(rng, tau, window, min_stint, positions=steps, low=0.0, high=3.0)
    params = params_of(tau, window, min_stint, max_window=4)
    snapshots = [start(len(tau), 4)]
    for row_entropies in entropies:
        h = arr(row_entropies, "float64")
        state, _ = switch_step(snapshots[-1], params, h)
        snapshots.append(state)
    steps_per_row = [0, steps, 3, 1, 7, 5]
    chosen = select_snapshots(snapshots, arr(steps_per_row))
    refs = []
    for row, s in enumerate(steps_per_row):
        index = arr([row])
        assert states_equal(chosen.select(index), snapshots[s].select(index))
        ref = ReferenceMachine(tau[row], window[row], min_stint[row])
        for position in range(s):
            ref.step(entropies[position][row])
        refs.append(ref)
    assert_matches(chosen, refs)
    assert states_equal(select_snapshots(snapshots, arr([4] * 6)), snapshots[4])


def test_switch_step_reads_nothing_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tensor value reaches Python inside switch_step (on CUDA each would be a sync).
    Torch only (under either backend parameter)."""
    global BACKEND
    BACKEND = "torch"
    state, params = stepped_state()
    h = torch.tensor([0.2, 2.9, 1.3, 0.1, 2.2], dtype=torch.float64)
    active = torch.tensor([True, False, True, True, False])

    def read_back(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor value read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    switch_step(state, params, h)
    switch_step(state, params, h, active)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_on_cuda() -> None:
    params = SwitchParams.from_lists([1.0, 2.0], [2, 3], [0, 2], "cuda", max_window=4)
    state = SwitchState.start(2, 4, "cuda")
    h = torch.tensor([1.5, 2.5], dtype=torch.float64, device="cuda")
    active = torch.tensor([True, False], device="cuda")
    snapshots = [state]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            state, _ = switch_step(state, params, h, active)
            snapshots.append(state)
        chosen = select_snapshots(snapshots, torch.tensor([2, 0], device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert chosen.count.tolist() == [2, 0]


@pytest.mark.parametrize(
    ("tau", "window", "min_stint", "field"),
    [
        ([float("nan")], [1], [0], "tau"),
        ([float("inf")], [1], [0], "tau"),
        (["1.0"], [1], [0], "tau"),
        ([True], [1], [0], "tau"),
        ([1.0], [0], [0], "window"),
        ([1.0], [9], [0], "window"),
        ([1.0], [2.5], [0], "window"),
        ([1.0], [1], [-1], "min_stint"),
        ([1.0], [1], [1.5], "min_stint"),
        ([1.0, 2.0], [1], [0, 0], "one value per row"),
    ],
)
def test_from_lists_validation(tau: list, window: list, min_stint: list, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        params_of(tau, window, min_stint, max_window=8)


def test_from_lists_values() -> None:
    params = params_of([1, 2.5], [8, 1], [0, 3], max_window=8)
    assert dtype_name(params.tau) == "float64" and params.tau.tolist() == [1.0, 2.5]
    assert dtype_name(params.window) == "int64" and params.window.tolist() == [8, 1]
    assert dtype_name(params.min_stint) == "int64" and params.min_stint.tolist() == [0, 3]
