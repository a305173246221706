"""How many draft tokens may a step verify? A batch-level goodput controller (issue #5).

Speculation pays when the tokens it adds per step outweigh what it adds to the step's time. The
controller picks the cap K (0 = no draft tokens) on every request's draft for the next step so
that the expected tokens per second of the whole batch is largest, from:

- the expected accepted length per request for each K, E[accepted | K] =
  sum_{k=1..K} prod_{i<=k} a_i, with a_i the request's estimated acceptance of its i-th draft
  token (`expected_accepted_length`; e.g. from `AcceptanceCalibrator`);
- online linear models of the engine's own step times (`LinearTimeModel`): verification time
  as a function of batch size and tokens verified, and draft time as a function of the number of
  draft forward passes and the rows they carry.

  goodput(K) = sum_r (1 + E_r[accepted | K]) / (T_verify(R, R * (1 + K)) + T_draft(passes(K), R))

It is conservative in one way: it prices every request at the full K although stop rules may end
drafts earlier. Until both time models have `min_samples` observations it keeps `initial_k`.
To stop it from flapping between two K of nearly equal goodput, it moves only when another K is
better by more than `margin` (relative) on `patience` consecutive decisions. Plain Python floats
and small float64 tensors: cheap, and the same observations give the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from vllm_adaptive.speculative.config import AdaptiveDraftConfig, initial_k


def expected_accepted_length(acceptance: torch.Tensor) -> torch.Tensor:
    """E[accepted tokens | K] for K = 0..width: float64 [R, width + 1] from acceptance [R, width].

    acceptance[r, i] is the probability that request r's (i+1)-th draft token is accepted given
    that the ones before it were; verification accepts a prefix, so the k-th token counts with
    probability prod_{i<=k} a_i.
    """
    if acceptance.dim() != 2:
        raise ValueError(
            f"acceptance must be [rows, positions], got shape {tuple(acceptance.shape)}"
        )
    survival = torch.cumprod(acceptance.double().clamp(0.0, 1.0), dim=1)
    zeros = torch.zeros_like(survival[:, :1])
    return torch.cat([zeros, torch.cumsum(survival, dim=1)], dim=1)


class LinearTimeModel:
    """seconds = c0 + c . x, fitted online by exponentially weighted least squares.

    Each observation multiplies the old weights by `forget` (0.98: about the last 50 steps
    count). Means and co-moments are updated in West's stable form, so a feature that never
    varied has exactly zero variance; its slope is then 0 (taken as free): the controller will
    try more tokens and learn their cost from the next steps. Slopes carry a small ridge
    penalty (`slope_prior` times the feature's variance: unit-free) that splits cost between
    collinear features. Slopes are clamped to >= 0 (more work never takes less time), and so
    is the intercept.
    """

    def __init__(self, num_features: int, forget: float = 0.98, slope_prior: float = 1e-6) -> None:
        if num_features < 1:
            raise ValueError(f"LinearTimeModel: num_features must be >= 1, got {num_features}")
        if not 0.0 < forget <= 1.0:
            raise ValueError(f"LinearTimeModel: forget must be in (0, 1], got {forget!r}")
        if not slope_prior > 0:
            raise ValueError(f"LinearTimeModel: slope_prior must be > 0, got {slope_prior!r}")
        self.num_features = num_features
        self.forget = float(forget)
        self.slope_prior = float(slope_prior)
        dim = num_features + 1  # z = [features, seconds]
        # Plain Python floats: a step adds one observation and reads a few predictions, and
        # torch's per-call overhead on [3, 3] tensors would cost more than the arithmetic.
        self._weight = 0.0
        self._mean = [0.0] * dim
        self._comoment = [[0.0] * dim for _ in range(dim)]  # sum w (z - mean)(z - mean)^T
        self._coef: list[float] | None = None
        self.num_observations = 0

    def observe(self, features: Sequence[float], seconds: float) -> None:
        """Add one measured step: its features and its wall-clock time."""
        if len(features) != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {list(features)}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        z = [*(float(f) for f in features), float(seconds)]
        self._weight = self._weight * self.forget + 1.0
        delta = [zi - mi for zi, mi in zip(z, self._mean)]
        self._mean = [mi + di / self._weight for mi, di in zip(self._mean, delta)]
        after = [zi - mi for zi, mi in zip(z, self._mean)]
        forget = self.forget
        self._comoment = [[c * forget + d * a for c, a in zip(row, after)]
                          for row, d in zip(self._comoment, delta)]
        self._coef = None
        self.num_observations += 1

    def coefficient_floats(self) -> list[float]:
        """[c0, c...] as Python floats (cached until the next observation); zeros before any."""
        if self._coef is None:
            n = self.num_features
            coef = [0.0] * (n + 1)
            if self.num_observations > 0:
                cov = self._comoment
                # (cov_xx + diag(ridge)) slopes = cov_xy, by Gaussian elimination with pivoting.
                a = [[cov[i][j] + (self.slope_prior * cov[i][i] + 1e-300 if i == j else 0.0)
                      for j in range(n)] + [cov[i][n]] for i in range(n)]
                slopes = [max(x, 0.0) for x in _solve(a)]
                coef[1:] = slopes
                coef[0] = max(self._mean[n] - sum(s * m for s, m in zip(slopes, self._mean)), 0.0)
            self._coef = coef
        return self._coef

    @property
    def coefficients(self) -> torch.Tensor:
        """[c0, c...] (float64); zeros before any observation."""
        return torch.tensor(self.coefficient_floats(), dtype=torch.float64)

    def predict(self, features: Sequence[float]) -> float:
        coef = self.coefficient_floats()
        return coef[0] + sum(c * float(f) for c, f in zip(coef[1:], features))


def _solve(augmented: list[list[float]]) -> list[float]:
    """x with A x = b for the augmented rows [A | b] (A square, positive definite here)."""
    rows = [list(r) for r in augmented]
    n = len(rows)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        rows[col], rows[pivot] = rows[pivot], rows[col]
        p = rows[col][col]
        if p == 0.0:
            continue
        for r in range(col + 1, n):
            factor = rows[r][col] / p
            if factor:
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        p = rows[r][r]
        x[r] = 0.0 if p == 0.0 else (rows[r][n] - sum(rows[r][c] * x[c] for c in range(r + 1, n))) / p
    return x


class GoodputController:
    """Chooses the cap K in 0..max_draft_tokens that maximises expected batch tokens per second."""

    def __init__(
        self,
        max_draft_tokens: int,
        *,
        initial_k: int | None = None,
        margin: float = 0.05,
        patience: int = 3,
        min_samples: int = 8,
        forget: float = 0.98,
        draft_runs_at_k0: bool = True,
    ) -> None:
        """`draft_runs_at_k0`: the draft model still runs one forward pass when K = 0 (vLLM's
        draft-model proposer does, to keep its KV cache in step with the target's tokens), so
        "no speculation" is priced with that pass."""
        if max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {max_draft_tokens}")
        initial = max_draft_tokens if initial_k is None else initial_k
        if not 0 <= initial <= max_draft_tokens:
            raise ValueError(f"initial_k must be in [0, {max_draft_tokens}], got {initial_k}")
        if not 0.0 <= margin:
            raise ValueError(f"margin must be >= 0, got {margin!r}")
        if patience < 1 or min_samples < 1:
            raise ValueError(
                f"patience and min_samples must be >= 1, got {patience}, {min_samples}"
            )
        self.max_draft_tokens = max_draft_tokens
        self.margin = float(margin)
        self.patience = patience
        self.min_samples = min_samples
        self.draft_runs_at_k0 = draft_runs_at_k0
        # Verification: features (batch size, tokens verified = rows + draft tokens).
        self.verify_time = LinearTimeModel(2, forget=forget)
        # Drafting: features (forward passes, forward passes * rows).
        self.draft_time = LinearTimeModel(2, forget=forget)
        self.k = initial
        self._streak = 0

    @classmethod
    def from_config(cls, config: AdaptiveDraftConfig) -> GoodputController:
        return cls(
            config.max_draft_tokens,
            initial_k=initial_k(config),
            margin=config.controller_margin,
            patience=config.controller_patience,
            min_samples=config.controller_min_samples,
            forget=config.controller_forget,
        )

    def observe_verify(self, num_rows: int, num_tokens: int, seconds: float) -> None:
        """A target step that verified `num_tokens` (bonus and draft) for `num_rows` requests."""
        self.verify_time.observe((num_rows, num_tokens), seconds)

    def observe_draft(self, num_rows: int, num_passes: int, seconds: float) -> None:
        """A propose call that ran `num_passes` draft forward passes over `num_rows` requests."""
        self.draft_time.observe((num_passes, num_passes * num_rows), seconds)

    @property
    def warmed_up(self) -> bool:
        return (
            min(self.verify_time.num_observations, self.draft_time.num_observations)
            >= self.min_samples
        )

    def draft_passes(self, k: int) -> int:
        """Draft forward passes needed for K draft tokens (the first pass drafts token 1)."""
        if k == 0:
            return 1 if self.draft_runs_at_k0 else 0
        return k

    def expected_goodput(self, acceptance: torch.Tensor) -> torch.Tensor:
        """Expected tokens per second for K = 0..max_draft_tokens, float64 [max_draft_tokens + 1].

        acceptance: [R, >= max_draft_tokens] per-request per-position acceptance estimates.
        """
        if acceptance.dim() != 2 or acceptance.shape[1] < self.max_draft_tokens:
            raise ValueError(
                f"acceptance must be [rows, >= {self.max_draft_tokens}], "
                f"got {tuple(acceptance.shape)}"
            )
        rows = acceptance.shape[0]
        width = self.max_draft_tokens
        accepted = expected_accepted_length(acceptance[:, :width].cpu()).sum(dim=0).tolist()
        return torch.tensor(self._goodput(rows, accepted), dtype=torch.float64)

    def expected_goodput_of_rates(self, rates: np.ndarray) -> list[float]:
        """`expected_goodput` where each request's acceptance is the same at every draft
        position (`rates` [R], as the policy estimates it): E[accepted | K] = sum_{i<=K} a^i,
        in numpy over the rows (plain floats for one row). A list of max_draft_tokens + 1."""
        width = self.max_draft_tokens
        if len(rates) == 1:
            rate = min(max(float(rates[0]), 0.0), 1.0)
            accepted, survival, total = [0.0], 1.0, 0.0
            for _ in range(width):
                survival *= rate
                total += survival
                accepted.append(total)
        else:
            clipped = np.clip(np.asarray(rates, dtype=np.float64), 0.0, 1.0)
            survival = np.cumprod(np.repeat(clipped[:, None], width, axis=1), axis=1)
            accepted = [0.0, *np.cumsum(survival, axis=1).sum(axis=0).tolist()]
        return self._goodput(len(rates), accepted)

    def _goodput(self, rows: int, accepted: list[float]) -> list[float]:
        """Tokens per second for K = 0..width from the batch's expected accepted tokens per K."""
        return [(rows + a) / max(self.step_seconds(rows, k), 1e-12) for k, a in enumerate(accepted)]

    def step_seconds(self, num_rows: int, k: int) -> float:
        """Predicted seconds of one step (draft, then verification) with cap K for `num_rows`."""
        # LinearTimeModel.predict of both models, written out (it runs for every K each step).
        passes = self.draft_passes(k)
        v0, v1, v2 = self.verify_time.coefficient_floats()
        verify = v0 + (v1 * num_rows + v2 * (num_rows * (1 + k)))
        if not passes:
            return verify
        d0, d1, d2 = self.draft_time.coefficient_floats()
        return verify + (d0 + (d1 * passes + d2 * (passes * num_rows)))

    def draft_cost_ratio(self, num_rows: int) -> float | None:
        """What extending every row's draft by one token costs (one more draft pass and one more
        verified token per row), relative to a plain step's verification, for `num_rows` rows;
        None until both time models have `min_samples` observations."""
        if not self.warmed_up or num_rows < 1:
            return None
        base = self.verify_time.predict((num_rows, num_rows))
        if base <= 0:
            return None
        _, per_pass, per_pass_row = self.draft_time.coefficient_floats()
        _, _, per_token = self.verify_time.coefficient_floats()
        return (per_pass + per_pass_row * num_rows + per_token * num_rows) / base

    def decide(self, acceptance: torch.Tensor) -> int:
        """The cap K for the next step; `acceptance` as in `expected_goodput`."""
        if acceptance.shape[0] == 0 or not self.warmed_up:
            return self.k
        return self._move(self.expected_goodput(acceptance).tolist())

    def decide_rates(self, rates: np.ndarray) -> int:
        """`decide` from each request's acceptance rate (`expected_goodput_of_rates`)."""
        if len(rates) == 0 or not self.warmed_up:
            return self.k
        return self._move(self.expected_goodput_of_rates(rates))

    def _move(self, goodput: list[float]) -> int:
        best = goodput.index(max(goodput))  # the first maximum: the smallest K among ties
        if best != self.k and goodput[best] > goodput[self.k] * (1.0 + self.margin):
            self._streak += 1
            if self._streak >= self.patience:
                self.k = best
                self._streak = 0
        else:
            self._streak = 0
        return self.k
