"""Which model writes each position? The per-request switching machine of Entropy Adaptive
Decoding (EAD, arXiv 2502.06833), vectorised over batch rows.

EAD pairs a small and a large model. The small model writes while it is confident: while the
rolling mean of the entropy of its next-token distribution over the last `window` positions is
at most the request's threshold `tau`; above it, the large model writes. `min_stint` is
hysteresis: after a switch the new owner keeps at least `min_stint` positions before the machine
may switch again, so that one noisy position cannot make the models alternate.

Each request has tau (bits), window w >= 1 and min_stint d >= 0, and state: the last entropies
pushed (at most max_window kept), the mode (SMALL or LARGE) and a stint counter c. It starts in
SMALL with c = 0 and no entropies. For each new position, with H the small model's next-token
entropy in bits:

1. push H into the window;
2. m = the mean of the last min(entries pushed, w) entries;
3. if c >= d: if the mode is SMALL and m > tau, it becomes LARGE and c = 0; else if the mode is
   LARGE and m <= tau, it becomes SMALL and c = 0;
4. the position's owner is the (new) mode; c += 1.

The caller computes H in bits (log base 2) from the small model's logits before temperature
(the model's own uncertainty, not the sampler's) and passes one [B] tensor per position.

`switch_step` applies the rule to every row with array ops: with torch tensors no host
synchronisation, so it can be queued on CUDA inside a draft loop; with numpy arrays (`host=True`,
what a CPU engine uses) the same ops without torch's per-op dispatch cost (microseconds each, ~20
ops per draft step). A NaN entropy makes m NaN: both comparisons are False and
the mode stays. `ReferenceMachine` is the same rule for one request in plain Python (the tests'
reference). `SwitchState` follows the batch (`select`, `where`, `assign`, `cat`), and
`select_snapshots` picks, per row, the state after that row's number of steps (the steps its
draft kept) from the states recorded after each draft step.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import numpy as np
import torch

# A [B, ...] array of rows: a torch tensor, or a numpy array on the host path.
Array = torch.Tensor | np.ndarray

# Default bound on the window a request may ask for (the width of `SwitchState.entropies`).
MAX_WINDOW = 64


@dataclasses.dataclass
class SwitchParams:
    """Each row's EAD parameters, on one device."""

    tau: Array  # [B] float64, bits
    window: Array  # [B] int64, 1..max_window
    min_stint: Array  # [B] int64, >= 0

    @classmethod
    def from_lists(
        cls,
        tau: Sequence[float],
        window: Sequence[int],
        min_stint: Sequence[int],
        device: torch.device | str = "cpu",
        max_window: int = MAX_WINDOW,
        host: bool = False,
    ) -> SwitchParams:
        """Checked host values to tensors on `device`, or numpy arrays with `host` (ValueError
        naming the field)."""
        if max_window < 1:
            raise ValueError(f"max_window must be >= 1, got {max_window}")
        tau, window, min_stint = list(tau), list(window), list(min_stint)
        if not len(tau) == len(window) == len(min_stint):
            raise ValueError(f"tau, window and min_stint need one value per row, got "
                             f"{len(tau)}, {len(window)} and {len(min_stint)}")
        for row, value in enumerate(tau):
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"tau[{row}] must be a finite number of bits, got {value!r}")
        for row, value in enumerate(window):
            if not _is_int(value) or not 1 <= value <= max_window:
                raise ValueError(f"window[{row}] must be an int in 1..{max_window}, got {value!r}")
        for row, value in enumerate(min_stint):
            if not _is_int(value) or value < 0:
                raise ValueError(f"min_stint[{row}] must be an int >= 0, got {value!r}")
        if host:
            return cls(
                tau=np.array([float(v) for v in tau], dtype=np.float64),
                window=np.array([int(v) for v in window], dtype=np.int64),
                min_stint=np.array([int(v) for v in min_stint], dtype=np.int64),
            )
        return cls(
            tau=torch.tensor([float(v) for v in tau], dtype=torch.float64, device=device),
            window=torch.tensor([int(v) for v in window], dtype=torch.int64, device=device),
            min_stint=torch.tensor([int(v) for v in min_stint], dtype=torch.int64, device=device),
        )

    def select(self, rows: Array) -> SwitchParams:
        return SwitchParams(self.tau[rows], self.window[rows], self.min_stint[rows])


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass
class SwitchState:
    """Each row's machine state. `entropies[r]` holds the last entries pushed, newest in the
    last column (older columns are zero until filled); `count` is capped at max_window. The
    fields are all torch tensors on one device, or all numpy arrays (`host`)."""

    entropies: Array  # [B, max_window] float64
    count: Array  # [B] int64, entries pushed, at most max_window
    large: Array  # [B] bool, the mode is LARGE
    stint: Array  # [B] int64, c: positions written since the last switch (or the start)

    @classmethod
    def start(
        cls, num_rows: int, max_window: int = MAX_WINDOW, device: torch.device | str = "cpu",
        host: bool = False,
    ) -> SwitchState:
        if max_window < 1:
            raise ValueError(f"max_window must be >= 1, got {max_window}")
        if host:
            return cls(
                entropies=np.zeros((num_rows, max_window), dtype=np.float64),
                count=np.zeros(num_rows, dtype=np.int64),
                large=np.zeros(num_rows, dtype=bool),
                stint=np.zeros(num_rows, dtype=np.int64),
            )
        return cls(
            entropies=torch.zeros(num_rows, max_window, dtype=torch.float64, device=device),
            count=torch.zeros(num_rows, dtype=torch.int64, device=device),
            large=torch.zeros(num_rows, dtype=torch.bool, device=device),
            stint=torch.zeros(num_rows, dtype=torch.int64, device=device),
        )

    @property
    def max_window(self) -> int:
        return self.entropies.shape[1]

    @property
    def host(self) -> bool:
        return isinstance(self.large, np.ndarray)

    def clone(self) -> SwitchState:
        return SwitchState(_copy(self.entropies), _copy(self.count), _copy(self.large), _copy(self.stint))

    def select(self, rows: Array) -> SwitchState:
        """The rows at int64 indices `rows` (copies)."""
        return SwitchState(self.entropies[rows], self.count[rows], self.large[rows],
                           self.stint[rows])

    def where(self, mask: Array, other: SwitchState) -> SwitchState:
        """Row r is self's where mask[r], else other's."""
        return SwitchState(
            entropies=_where(mask[:, None], self.entropies, other.entropies),
            count=_where(mask, self.count, other.count),
            large=_where(mask, self.large, other.large),
            stint=_where(mask, self.stint, other.stint),
        )

    def assign(self, rows: Array, other: SwitchState) -> None:
        """In place: row rows[i] of self becomes row i of other."""
        self.entropies[rows] = other.entropies
        self.count[rows] = other.count
        self.large[rows] = other.large
        self.stint[rows] = other.stint

    @staticmethod
    def cat(states: Sequence[SwitchState]) -> SwitchState:
        """The rows of `states`, one after the other (same max_window)."""
        _check_widths(states)
        return SwitchState(
            entropies=_cat([s.entropies for s in states]),
            count=_cat([s.count for s in states]),
            large=_cat([s.large for s in states]),
            stint=_cat([s.stint for s in states]),
        )

    @staticmethod
    def stack(states: Sequence[SwitchState]) -> SwitchStateHistory:
        """Snapshots [S, B, ...] of the same rows (states[s]: the state after s steps)."""
        _check_widths(states)
        return SwitchStateHistory(
            entropies=_stack([s.entropies for s in states]),
            count=_stack([s.count for s in states]),
            large=_stack([s.large for s in states]),
            stint=_stack([s.stint for s in states]),
        )


def _check_widths(states: Sequence[SwitchState]) -> None:
    if not states:
        raise ValueError("need at least one state")
    widths = {s.max_window for s in states}
    if len(widths) > 1:
        raise ValueError(f"states have different max_window: {sorted(widths)}")
    if len({s.host for s in states}) > 1:
        raise ValueError("states mix numpy (host) and torch arrays")


# The few array operations whose spelling differs between torch and numpy.

def _copy(a: Array) -> Array:
    return a.copy() if isinstance(a, np.ndarray) else a.clone()


def _where(mask: Array, a: Array | float | int, b: Array | float | int) -> Array:
    return np.where(mask, a, b) if isinstance(mask, np.ndarray) else torch.where(mask, a, b)


def _cat(arrays: Sequence[Array], axis: int = 0) -> Array:
    if isinstance(arrays[0], np.ndarray):
        return np.concatenate(arrays, axis=axis)
    return torch.cat(list(arrays), dim=axis)


def _stack(arrays: Sequence[Array]) -> Array:
    return np.stack(arrays) if isinstance(arrays[0], np.ndarray) else torch.stack(list(arrays))


def _arange(n: int, like: Array) -> Array:
    return np.arange(n) if isinstance(like, np.ndarray) else torch.arange(n, device=like.device)


def _float64(a: Array) -> Array:
    return a.astype(np.float64, copy=False) if isinstance(a, np.ndarray) else a.to(torch.float64)


def _int64(a: Array) -> Array:
    return a.astype(np.int64, copy=False) if isinstance(a, np.ndarray) else a.to(torch.int64)


@dataclasses.dataclass
class SwitchStateHistory:
    """`SwitchState`'s fields stacked over snapshots: [S, B, ...]."""

    entropies: Array  # [S, B, max_window]
    count: Array  # [S, B]
    large: Array  # [S, B]
    stint: Array  # [S, B]

    def at(self, steps_per_row: Array) -> SwitchState:
        """Row r of snapshot steps_per_row[r], for every row (one gather per field)."""
        rows = _arange(self.count.shape[1], self.count)
        steps = _int64(steps_per_row)
        return SwitchState(self.entropies[steps, rows], self.count[steps, rows],
                           self.large[steps, rows], self.stint[steps, rows])


def select_snapshots(snapshots: Sequence[SwitchState], steps_per_row: Array) -> SwitchState:
    """Row r of snapshots[steps_per_row[r]]: snapshots[0] is the state before the first step,
    snapshots[s] the state after s steps."""
    return SwitchState.stack(snapshots).at(steps_per_row)


def window_mean(entropies: Array, count: Array, window: Array) -> Array:
    """[B] float64 mean of each row's last min(count, window) entries (rows with none: NaN)."""
    width = entropies.shape[1]
    n = count.clip(max=window) if isinstance(count, np.ndarray) else torch.minimum(count, window)
    columns = _arange(width, entropies)
    in_window = columns[None, :] >= (width - n)[:, None]
    total = _where(in_window, entropies, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / _float64(n)


def switch_step(
    state: SwitchState,
    params: SwitchParams,
    entropy_bits: Array,
    active: Array | None = None,
) -> tuple[SwitchState, Array]:
    """One position for every row; returns (new state, owner_large [B] bool). Rows where
    `active` is False keep their state unchanged (their returned owner is their current mode).
    State, params, entropies and `active` are all torch tensors or all numpy arrays.

    Host-sync free on torch: only ops on the rows, no reads of their values."""
    width = state.max_window
    entropy = _float64(entropy_bits)
    entropies = _cat((state.entropies[:, 1:], entropy[:, None]), axis=1)
    count = (state.count + 1).clip(max=width)
    mean = window_mean(entropies, count, params.window)
    may_switch = state.stint >= params.min_stint
    wants_other = _where(state.large, mean <= params.tau, mean > params.tau)
    switch = may_switch & wants_other
    large = state.large ^ switch
    stint = _where(switch, 1, state.stint + 1)
    stepped = SwitchState(entropies, count, large, stint)
    if active is not None:
        stepped = stepped.where(active, state)
    return stepped, stepped.large


@dataclasses.dataclass
class ReferenceMachine:
    """The rule of the module docstring for one request, in plain Python (tests' reference)."""

    tau: float
    window: int
    min_stint: int
    history: list[float] = dataclasses.field(default_factory=list)  # every entropy pushed
    large: bool = False
    stint: int = 0

    def mean(self) -> float:
        """Mean of the last min(len(history), window) entropies pushed."""
        last = self.history[-self.window:]
        return sum(last) / len(last)

    def step(self, entropy_bits: float) -> bool:
        """Push one position's entropy; returns whether the large model owns it."""
        self.history.append(float(entropy_bits))
        m = self.mean()
        if self.stint >= self.min_stint:
            if not self.large and m > self.tau:
                self.large, self.stint = True, 0
            elif self.large and m <= self.tau:
                self.large, self.stint = False, 0
        self.stint += 1
        return self.large
