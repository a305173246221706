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

import torch

from vllm_adaptive.speculative.config import AdaptiveDraftConfig


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
        self._weight = 0.0
        self._mean = torch.zeros(dim, dtype=torch.float64)
        self._comoment = torch.zeros(dim, dim, dtype=torch.float64)  # sum w (z - mean)(z - mean)^T
        self._coef: torch.Tensor | None = None
        self.num_observations = 0

    def observe(self, features: Sequence[float], seconds: float) -> None:
        """Add one measured step: its features and its wall-clock time."""
        if len(features) != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {list(features)}")
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
        z = torch.tensor([*features, seconds], dtype=torch.float64)
        self._weight = self._weight * self.forget + 1.0
        delta = z - self._mean
        self._mean = self._mean + delta / self._weight
        self._comoment = self._comoment * self.forget + torch.outer(delta, z - self._mean)
        self._coef = None
        self.num_observations += 1

    @property
    def coefficients(self) -> torch.Tensor:
        """[c0, c...] (float64); zeros before any observation."""
        if self._coef is None:
            coef = torch.zeros(self.num_features + 1, dtype=torch.float64)
            if self.num_observations > 0:
                cov_xx = self._comoment[:-1, :-1]
                cov_xy = self._comoment[:-1, -1]
                ridge = self.slope_prior * torch.diagonal(cov_xx) + 1e-300
                slopes = torch.linalg.solve(cov_xx + torch.diag(ridge), cov_xy).clamp(min=0.0)
                coef[1:] = slopes
                coef[0] = (self._mean[-1] - slopes @ self._mean[:-1]).clamp(min=0.0)
            self._coef = coef
        return self._coef

    def predict(self, features: Sequence[float]) -> float:
        coef = self.coefficients
        return float(coef[0]) + sum(float(c) * float(f) for c, f in zip(coef[1:], features))


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
            initial_k=config.controller_initial_k,
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
        tokens = rows + expected_accepted_length(acceptance[:, :width].cpu()).sum(dim=0)
        seconds = torch.tensor(
            [self.step_seconds(rows, k) for k in range(width + 1)], dtype=torch.float64
        )
        return tokens / seconds.clamp(min=1e-12)

    def step_seconds(self, num_rows: int, k: int) -> float:
        """Predicted seconds of one step (draft, then verification) with cap K for `num_rows`."""
        passes = self.draft_passes(k)
        draft = self.draft_time.predict((passes, passes * num_rows)) if passes else 0.0
        return self.verify_time.predict((num_rows, num_rows * (1 + k))) + draft

    def decide(self, acceptance: torch.Tensor) -> int:
        """The cap K for the next step; `acceptance` as in `expected_goodput`."""
        if acceptance.shape[0] == 0 or not self.warmed_up:
            return self.k
        goodput = self.expected_goodput(acceptance)
        best = int(torch.argmax(goodput))  # the first maximum: the smallest K among ties
        if best != self.k and goodput[best] > goodput[self.k] * (1.0 + self.margin):
            self._streak += 1
            if self._streak >= self.patience:
                self.k = best
                self._streak = 0
        else:
            self._streak = 0
        return self.k
