"""When does a request's draft end? Batched stop rules for adaptive draft length (issue #5).

At each draft step the proposer has the draft model's next-token distribution for every row still
drafting ([rows, vocab]). `draft_stats` reduces it to per-row statistics, and a stop rule turns
those into a `StopDecision` per row: `stop` ends the row's draft after this step, `keep` says
whether the token drafted at this step stays in the draft. Rules are batched torch, never leave
the device, and never synchronise with the host.

- `EntropyStopRule`: stop when the draft's entropy H (nats) exceeds a threshold.
- `AdaEDLStopRule`: Agrawal, Jeon & Lee 2024, "AdaEDL: Early Draft Stopping for Speculative
  Decoding of Large Language Models via an Entropy-based Lower Bound on Token Acceptance
  Probability" (NeurIPS ENLSP workshop, PMLR 262; arXiv 2410.18351). 1 - sqrt(gamma * H) is an
  approximate lower bound on the token's acceptance probability; stop when it falls below
  lambda. lambda is per request and follows the paper's Algorithm 1 after each verification
  (`update_lambda`). Defaults are the paper's (gamma 0.2, beta1 0.5, beta2 0.9, eps 0.01,
  target 0.9). The paper's text could not be read here: the rule and Algorithm 1 follow two
  independent public implementations that agree with each other and with its abstract.
- `SpecDecStopRule`: the threshold policy of SpecDec++ (Huang, Guo & Wang 2024, "SpecDec++:
  Boosting Speculative Decoding via Adaptive Candidate Lengths", arXiv 2405.19715): stop when
  the probability that at least one token of the current draft is rejected, 1 - prod(a_i),
  exceeds theta. SpecDec++ trains a head to predict a_i; here a_i comes from
  `AcceptanceCalibrator`, an online map from the draft's confidence to the acceptance rate the
  engine observes after verification (no training).

Lossless by construction: a rule sees only the draft side, so every drafted position is still
verified by vLLM's rejection sampler against a draft token drawn from the distribution it reports.
One subtlety under random sampling with probabilistic drafts: a rule may drop the token drafted at
this step (`keep` False) only when its decision depends on the distribution alone, not on which
token was drawn; otherwise the tokens that reach verification are no longer distributed as the
draft claims. Entropy and AdaEDL depend on the distribution only; SpecDec++ may use the drawn
token's probability and therefore always keeps it (it stops *after* the token, as in the paper).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from vllm_adaptive.kernels.row_stats import check_rows, row_stats
from vllm_adaptive.speculative.config import AUTO, DEFAULT_DRAFT_COST_RATIO, AdaptiveDraftConfig


class DraftStats(NamedTuple):
    """Statistics of the draft's next-token distribution per row, each float32 [R]."""

    entropy: torch.Tensor | None  # Shannon entropy, nats (None: not computed, no rule needs it)
    top_prob: torch.Tensor  # largest probability
    token_prob: torch.Tensor  # probability of the drafted token


def draft_stats(
    logits: torch.Tensor, token_ids: torch.Tensor | None = None, entropy: bool = True
) -> DraftStats:
    """Statistics of softmax(logits) [R, V] (-inf entries are masked tokens).

    Pass the logits the draft sampled from (divided by the temperature when it samples); the
    entropy is that distribution's. `token_ids` [R] are the drafted tokens; None means greedy
    drafting, whose token is the argmax, so token_prob = top_prob. entropy=False skips the
    entropy (one max and one logsumexp per row: what SpecDec++ needs, every draft step).
    """
    check_rows(logits, None, "draft_stats")
    if entropy:
        stats = row_stats(logits, fields=("row_max", "lse", "entropy"))
        row_max, lse, row_entropy = stats.row_max, stats.lse, stats.entropy
    else:
        x = logits.float()
        row_max, lse, row_entropy = x.amax(dim=-1), torch.logsumexp(x, dim=-1), None
    top_prob = torch.exp(row_max - lse)
    if token_ids is None:
        token_prob = top_prob
    else:
        _check_token_ids(token_ids, logits)
        token_logit = logits.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1).float()
        token_prob = torch.exp(token_logit - lse)
    return DraftStats(entropy=row_entropy, top_prob=top_prob, token_prob=token_prob)


def draft_stats_from_probs(
    probs: torch.Tensor, token_ids: torch.Tensor | None = None, entropy: bool = True
) -> DraftStats:
    """Statistics of probability rows [R, V] (each summing to 1; zeros are masked tokens)."""
    check_rows(probs, None, "draft_stats_from_probs")
    return draft_stats(torch.log(probs.float()), token_ids, entropy)


_CPU = torch.device("cpu")
# The largest [rows, vocab] float32 matrix `host_draft_stats` reduces in numpy (one core).
HOST_STATS_MAX_ELEMENTS = 1 << 16


class HostStats(NamedTuple):
    """`DraftStats` as numpy float32 arrays [R], for the policy's host path (CPU devices)."""

    entropy: np.ndarray | None
    top_prob: np.ndarray
    token_prob: np.ndarray


def host_draft_stats(
    logits: torch.Tensor, token_ids: torch.Tensor | None = None, entropy: bool = True,
    probs: torch.Tensor | None = None,
) -> HostStats:
    """`draft_stats` (or `draft_stats_from_probs` when `probs` are given) of CPU tensors as numpy
    float32 arrays.

    Small float32 matrices (at most HOST_STATS_MAX_ELEMENTS) are reduced in numpy: on a CPU a
    torch op costs microseconds of dispatch (torch.logsumexp over 1536 logits ~19 us against
    ~9 us in numpy); larger ones, and rows with no finite logit, go through `draft_stats`, whose
    torch reductions use every core.
    """
    source = logits if probs is None else probs
    x = source.numpy() if source.dtype == torch.float32 and not source.requires_grad else None
    if x is not None and x.size <= HOST_STATS_MAX_ELEMENTS:
        if probs is not None:
            with np.errstate(divide="ignore"):
                x = np.log(x)
        row_max = x.max(axis=1)
        if np.isfinite(row_max).all():
            shifted = x - row_max[:, None]  # <= 0; -inf where masked
            weights = np.exp(shifted)
            total = weights.sum(axis=1)
            lse = row_max + np.log(total)
            top = np.exp(row_max - lse)
            row_entropy = None
            if entropy:
                shifted[weights == 0] = 0.0  # masked tokens carry no weight (and no 0 * -inf)
                row_entropy = np.maximum(np.log(total) - (weights * shifted).sum(axis=1) / total, 0.0)
            if probs is None and token_ids is None:
                token = top
            else:
                assert token_ids is not None
                rows = np.arange(x.shape[0])
                token = np.exp(x[rows, token_ids.numpy().astype(np.int64)] - lse)
            f32 = np.float32
            return HostStats(
                entropy=None if row_entropy is None else row_entropy.astype(f32, copy=False),
                top_prob=top.astype(f32, copy=False),
                token_prob=token.astype(f32, copy=False),
            )
    stats = (draft_stats(logits, token_ids, entropy) if probs is None
             else draft_stats_from_probs(probs, token_ids, entropy))
    top_prob = stats.top_prob.numpy()
    return HostStats(
        entropy=None if stats.entropy is None else stats.entropy.numpy(),
        top_prob=top_prob,
        token_prob=top_prob if stats.token_prob is stats.top_prob else stats.token_prob.numpy(),
    )


class OneRowStats(NamedTuple):
    """`HostStats` of one row as Python floats (float32 values): the one-row (batch 1) path."""

    entropy: float | None
    top_prob: float
    token_prob: float


_FLOAT32 = struct.Struct("f")


def f32(value: float) -> float:
    """`value` rounded to float32, as a Python float (a struct round trip: a tenth of a
    microsecond, a third of np.float32's). Python's float64 arithmetic on float32 values, rounded
    after each +, -, *, / or sqrt, gives numpy's float32 result exactly."""
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def host_row_stats(
    logits: torch.Tensor, token_ids: torch.Tensor, probs: torch.Tensor | None = None,
    entropy: bool = True,
) -> OneRowStats | None:
    """`host_draft_stats` of a one-row CPU draft step as Python floats: `logits` [1, V], the
    drafted token [1], and `probs` [1, V] it was sampled from, or None for greedy drafting, whose
    token is the argmax of the logits, so its probability is the top one. CPU tensors (the
    host_math path's). One fused softmax over the row (and a dot for the entropy), nothing on
    one-element arrays. None when the row has no finite logit: the caller takes
    `host_draft_stats`."""
    if probs is None:
        p = torch.softmax(logits, dim=-1, dtype=torch.float32).numpy()[0]
        best = int(p.argmax())
        top = float(p[best])
        if not top > 0.0:  # no finite logit (NaN)
            return None
        row_entropy = None
        if entropy:
            x = logits.numpy()[0] if logits.dtype == torch.float32 else logits.float().numpy()[0]
            # H = lse - sum p x, with lse = x[best] - log p[best] (the largest p: the most precise).
            spread = float(np.dot(p, x))
            if math.isnan(spread):  # masked tokens: probability 0 times -inf
                spread = float(np.dot(p, np.where(p > 0, x, 0.0)))
            row_entropy = f32(max(float(x[best]) - math.log(top) - spread, 0.0))
        top = f32(top)
        return OneRowStats(entropy=row_entropy, top_prob=top, token_prob=top)
    token = token_ids.item()
    p = probs.numpy()[0] if probs.dtype == torch.float32 else probs.float().numpy()[0]
    top = float(p.max())
    if not top > 0.0:
        return None
    row_entropy = None
    if entropy:
        with np.errstate(divide="ignore"):
            log_p = np.log(p)
        spread = float(np.dot(p, log_p))
        if math.isnan(spread):  # masked tokens: probability 0 times -inf
            spread = float(np.dot(p, np.where(p > 0, log_p, 0.0)))
        row_entropy = f32(max(-spread, 0.0))
    return OneRowStats(entropy=row_entropy, top_prob=f32(top), token_prob=f32(float(p[token])))


def host_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` (on the host) on `device`. To a GPU, through pinned memory with a non-blocking
    copy: a copy from pageable memory waits for all the work queued on the stream."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _check_token_ids(token_ids: torch.Tensor, logits: torch.Tensor) -> None:
    if token_ids.shape != logits.shape[:1] or token_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"token_ids must be int32/int64 of shape [{logits.shape[0]}] (one per row), "
            f"got shape {tuple(token_ids.shape)} dtype {token_ids.dtype}"
        )


class DraftState(NamedTuple):
    """Per-row state of the drafts in progress, each float32 [R].

    log_survival: sum of log a_i over the tokens this draft has kept so far (SpecDec++);
        exp(log_survival) is the estimated probability that all of them are accepted.
    lam: the AdaEDL threshold lambda of the row's request.
    """

    log_survival: torch.Tensor
    lam: torch.Tensor

    @staticmethod
    def start(
        num_rows: int, lam: float | torch.Tensor = 0.0, device: torch.device | str | None = None
    ) -> DraftState:
        """The state of `num_rows` drafts that have drafted nothing yet.

        `lam`: each row's AdaEDL lambda (new requests start at AdaEDLStopRule.lam).
        """
        log_survival = torch.zeros(num_rows, dtype=torch.float32, device=device)
        if isinstance(lam, torch.Tensor):
            lam_rows = lam.to(device=log_survival.device, dtype=torch.float32)
            if lam_rows.shape != (num_rows,):
                raise ValueError(f"lam must have shape [{num_rows}], got {tuple(lam_rows.shape)}")
        else:
            lam_rows = torch.full((num_rows,), float(lam), dtype=torch.float32, device=device)
        return DraftState(log_survival=log_survival, lam=lam_rows)

    def select(self, rows: torch.Tensor) -> DraftState:
        """The state of `rows` only (e.g. the rows still drafting)."""
        return DraftState(self.log_survival[rows], self.lam[rows])


class StopDecision(NamedTuple):
    """A rule's decision for each row of one draft step."""

    stop: torch.Tensor  # bool [R]: no further draft tokens for this row after this step
    keep: torch.Tensor  # bool [R]: the token drafted at this step is part of the draft
    score: torch.Tensor  # float32 [R]: the statistic compared with the rule's threshold
    state: DraftState  # the state after this step


class StopRule(Protocol):
    name: str
    needs_entropy: bool  # whether the rule reads DraftStats.entropy

    def __call__(self, stats: DraftStats, state: DraftState) -> StopDecision: ...

    def decide_host(
        self, stats: HostStats, log_survival: np.ndarray, lam: np.ndarray
    ) -> HostDecision: ...

    def decide_one(self, stats: OneRowStats, log_survival: float, lam: float) -> tuple[bool, bool, float]:
        """`decide_host` of one row in Python floats: (stop, keep, log_survival after)."""
        ...


class HostDecision(NamedTuple):
    """`StopDecision` on the host: bool / float32 numpy arrays [R]; `log_survival` is the
    state after this step (SpecDec++), the input array itself for the other rules."""

    stop: np.ndarray
    keep: np.ndarray
    log_survival: np.ndarray


def _host_decision(stop: np.ndarray, keep_stopping_token: bool, log_survival: np.ndarray) -> HostDecision:
    keep = np.ones_like(stop) if keep_stopping_token else ~stop
    return HostDecision(stop=stop, keep=keep, log_survival=log_survival)


def _decision(
    stop: torch.Tensor, keep_stopping_token: bool, score: torch.Tensor, state: DraftState
) -> StopDecision:
    keep = torch.ones_like(stop) if keep_stopping_token else ~stop
    return StopDecision(stop=stop, keep=keep, score=score, state=state)


@dataclasses.dataclass(frozen=True)
class NoStopRule:
    """Never stops early: drafts run to the controller's cap (fixed-K speculation)."""

    name: str = dataclasses.field(default="none", init=False)
    needs_entropy: bool = dataclasses.field(default=False, init=False)

    def __call__(self, stats: DraftStats, state: DraftState) -> StopDecision:
        stop = torch.zeros_like(stats.top_prob, dtype=torch.bool)
        return _decision(stop, True, torch.zeros_like(stats.top_prob), state)

    def decide_host(self, stats: HostStats, log_survival: np.ndarray, lam: np.ndarray) -> HostDecision:
        return _host_decision(np.zeros(len(stats.top_prob), dtype=bool), True, log_survival)

    def decide_one(self, stats: OneRowStats, log_survival: float, lam: float) -> tuple[bool, bool, float]:
        return False, True, log_survival


@dataclasses.dataclass(frozen=True)
class EntropyStopRule:
    """Stop after a step whose draft entropy exceeds `threshold` nats (score: the entropy).

    With keep_stopping_token False the uncertain token itself is dropped instead (as AdaEDL
    does); that costs the draft step that produced it but saves verifying it.
    """

    threshold: float
    keep_stopping_token: bool = True
    name: str = dataclasses.field(default="entropy", init=False)
    needs_entropy: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"EntropyStopRule: threshold must be > 0 nats, got {self.threshold!r}")

    def __call__(self, stats: DraftStats, state: DraftState) -> StopDecision:
        return _decision(
            stats.entropy > self.threshold, self.keep_stopping_token, stats.entropy, state
        )

    def decide_host(self, stats: HostStats, log_survival: np.ndarray, lam: np.ndarray) -> HostDecision:
        assert stats.entropy is not None
        return _host_decision(stats.entropy > np.float32(self.threshold), self.keep_stopping_token,
                              log_survival)

    def decide_one(self, stats: OneRowStats, log_survival: float, lam: float) -> tuple[bool, bool, float]:
        assert stats.entropy is not None
        stop = stats.entropy > f32(self.threshold)
        return stop, self.keep_stopping_token or not stop, log_survival


@dataclasses.dataclass(frozen=True)
class AdaEDLStopRule:
    """Stop when the acceptance lower bound 1 - sqrt(gamma * H) falls below the row's lambda.

    Score: the bound (may be negative for large H). lambda lives in `DraftState.lam`, one per
    request, starting at `lam`; `update_lambda` applies Algorithm 1 after each verification.
    The paper stops *before* the token whose bound failed; keep_stopping_token False does that.
    """

    gamma: float = 0.2
    lam: float = 0.7
    keep_stopping_token: bool = True
    adapt: bool = True
    target_acceptance: float = 0.9
    step: float = 0.01
    beta1: float = 0.5
    beta2: float = 0.9
    name: str = dataclasses.field(default="adaedl", init=False)
    needs_entropy: bool = dataclasses.field(default=True, init=False)

    def __post_init__(self) -> None:
        checks = {
            "gamma": math.isfinite(self.gamma) and self.gamma > 0,
            "lam": 0.0 <= self.lam <= 1.0,
            "target_acceptance": 0.0 < self.target_acceptance <= 1.0,
            "step": 0.0 <= self.step <= 1.0,
            "beta1": 0.0 <= self.beta1 < 1.0,
            "beta2": 0.0 <= self.beta2 < 1.0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"AdaEDLStopRule: {key} out of range, got {getattr(self, key)!r}")

    def lower_bound(self, entropy: torch.Tensor) -> torch.Tensor:
        """1 - sqrt(gamma * H), the approximate lower bound on the acceptance probability."""
        return 1.0 - torch.sqrt(self.gamma * entropy.clamp(min=0.0))

    def __call__(self, stats: DraftStats, state: DraftState) -> StopDecision:
        bound = self.lower_bound(stats.entropy)
        return _decision(bound < state.lam, self.keep_stopping_token, bound, state)

    def decide_host(self, stats: HostStats, log_survival: np.ndarray, lam: np.ndarray) -> HostDecision:
        assert stats.entropy is not None
        bound = np.float32(1.0) - np.sqrt(np.float32(self.gamma) * np.maximum(stats.entropy, np.float32(0.0)))
        return _host_decision(bound < lam, self.keep_stopping_token, log_survival)

    def decide_one(self, stats: OneRowStats, log_survival: float, lam: float) -> tuple[bool, bool, float]:
        assert stats.entropy is not None
        bound = f32(1.0 - f32(math.sqrt(f32(f32(self.gamma) * max(stats.entropy, 0.0)))))
        stop = bound < lam
        return stop, self.keep_stopping_token or not stop, log_survival

    def update_lambda(
        self,
        lam: torch.Tensor,
        acceptance_ema: torch.Tensor,
        num_drafted: torch.Tensor,
        num_accepted: torch.Tensor,
        max_draft_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Algorithm 1 for each request after verification; returns (lambda, acceptance EMA).

        AR <- beta1 * AR + (1 - beta1) * accepted / drafted; lambda' = lambda + step if
        AR < target, lambda - step if fewer than max_draft_tokens were accepted, else lambda;
        lambda <- beta2 * lambda + (1 - beta2) * lambda', clamped to [0, 1]. Requests that
        drafted nothing keep both. Start AR at `target_acceptance`. All [R], float32.
        """
        if not self.adapt:
            return lam, acceptance_ema
        drafted = num_drafted > 0
        rate = num_accepted.float() / num_drafted.clamp(min=1).float()
        ema = torch.where(
            drafted, self.beta1 * acceptance_ema + (1.0 - self.beta1) * rate, acceptance_ema
        )
        direction = torch.where(
            ema < self.target_acceptance,
            1.0,
            torch.where(num_accepted < max_draft_tokens, -1.0, 0.0),
        )
        proposal = lam + self.step * direction
        moved = (self.beta2 * lam + (1.0 - self.beta2) * proposal).clamp(0.0, 1.0)
        return torch.where(drafted, moved, lam), ema

    def update_lambda_one(
        self, lam: float, acceptance_ema: float, num_drafted: int, num_accepted: int,
        max_draft_tokens: int,
    ) -> tuple[float, float]:
        """`update_lambda_host` of one request that drafted `num_drafted` > 0 tokens, in Python
        floats rounded to float32 after each operation (the array path's values exactly)."""
        if not self.adapt:
            return lam, acceptance_ema
        rate = f32(num_accepted / num_drafted)
        ema = f32(f32(f32(self.beta1) * acceptance_ema) + f32(f32(1.0 - self.beta1) * rate))
        if ema < f32(self.target_acceptance):
            direction = 1.0
        else:
            direction = -1.0 if num_accepted < max_draft_tokens else 0.0
        proposal = f32(lam + f32(self.step) * direction)
        moved = f32(f32(f32(self.beta2) * lam) + f32(f32(1.0 - self.beta2) * proposal))
        return min(max(moved, 0.0), 1.0), ema

    def update_lambda_host(
        self, lam: np.ndarray, acceptance_ema: np.ndarray, num_drafted: np.ndarray,
        num_accepted: np.ndarray, max_draft_tokens: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`update_lambda` on numpy float32 arrays (int arrays for the counts), in float32."""
        if not self.adapt:
            return lam, acceptance_ema
        f32 = np.float32
        drafted = num_drafted > 0
        rate = num_accepted.astype(f32) / np.maximum(num_drafted, 1).astype(f32)
        ema = np.where(drafted, f32(self.beta1) * acceptance_ema + f32(1.0 - self.beta1) * rate,
                       acceptance_ema).astype(f32)
        direction = np.where(ema < f32(self.target_acceptance), f32(1.0),
                             np.where(num_accepted < max_draft_tokens, f32(-1.0), f32(0.0))).astype(f32)
        proposal = lam + f32(self.step) * direction
        moved = np.clip(f32(self.beta2) * lam + f32(1.0 - self.beta2) * proposal, f32(0.0), f32(1.0))
        return np.where(drafted, moved, lam).astype(f32), ema


@dataclasses.dataclass(frozen=True)
class SpecDecStopRule:
    """Stop after the token at which 1 - prod(a_i) over the draft so far exceeds `threshold`.

    a_i = calibrator.acceptance(confidence of token i), the confidence being the draft's largest
    probability ("top_prob") or the drafted token's ("token_prob"). Score: 1 - prod(a_i).
    """

    threshold: float
    calibrator: AcceptanceCalibrator
    confidence: str = "top_prob"
    name: str = dataclasses.field(default="specdec", init=False)
    needs_entropy: bool = dataclasses.field(default=False, init=False)

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(
                f"SpecDecStopRule: threshold must be in (0, 1), got {self.threshold!r}"
            )
        if self.confidence not in ("top_prob", "token_prob"):
            raise ValueError(
                "SpecDecStopRule: confidence must be 'top_prob' or 'token_prob', "
                f"got {self.confidence!r}"
            )

    def __call__(self, stats: DraftStats, state: DraftState) -> StopDecision:
        confidence = stats.top_prob if self.confidence == "top_prob" else stats.token_prob
        log_survival = state.log_survival + self.calibrator.log_acceptance(confidence)
        reject_any = -torch.expm1(log_survival)  # 1 - prod(a_i), accurate when it is small
        new_state = state._replace(log_survival=log_survival)
        return _decision(reject_any > self.threshold, True, reject_any, new_state)

    def decide_host(self, stats: HostStats, log_survival: np.ndarray, lam: np.ndarray) -> HostDecision:
        confidence = stats.top_prob if self.confidence == "top_prob" else stats.token_prob
        after = log_survival + self.calibrator.log_acceptance_host(confidence)
        return _host_decision(-np.expm1(after) > np.float32(self.threshold), True, after)

    def decide_one(self, stats: OneRowStats, log_survival: float, lam: float) -> tuple[bool, bool, float]:
        confidence = stats.top_prob if self.confidence == "top_prob" else stats.token_prob
        after = f32(log_survival + self.calibrator.log_acceptance_of(confidence))
        return f32(-math.expm1(after)) > f32(self.threshold), True, after


def verification_outcomes(
    draft_lengths: torch.Tensor, num_accepted: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which draft positions verification observed, and which of those it accepted.

    Verification accepts a prefix of each draft: positions before num_accepted were accepted,
    the one at num_accepted (if drafted) was rejected, and later ones were never tested; they are
    censored, not rejections. Returns (observed, accepted), bool [R, width].
    """
    if draft_lengths.shape != num_accepted.shape or draft_lengths.dim() != 1:
        raise ValueError(
            "draft_lengths and num_accepted must both be [R], got "
            f"{tuple(draft_lengths.shape)} and {tuple(num_accepted.shape)}"
        )
    position = torch.arange(width, device=draft_lengths.device).unsqueeze(0)
    lengths = draft_lengths.long().clamp(max=width).unsqueeze(1)
    accepted_count = torch.minimum(num_accepted.long().unsqueeze(1), lengths)
    accepted = position < accepted_count
    observed = accepted | ((position == accepted_count) & (position < lengths))
    return observed, accepted


class AcceptanceCalibrator:
    """Online map from draft confidence in [0, 1] to the rate at which the target accepts.

    `num_bins` equal-width bins over the confidence; each holds (decayed) counts of observed and
    accepted draft tokens plus `prior` pseudo-observations at an acceptance equal to the bin's
    centre (a calibrated draft's confidence). estimate = (prior * centre + accepted) /
    (prior + observed). Each `update` first multiplies the counts by `decay` (1: no forgetting;
    0.999: about the last thousand updates count). State: two float64 numpy vectors of
    `num_bins` on the host (updated once per engine step from host values); sums are plain
    reductions, so the same inputs always give the same state. The table a step reads
    (float32 estimates and their logarithms, log taken in float64) is rebuilt once per update,
    and copied to a device only when a device path asks for it.
    """

    def __init__(
        self,
        num_bins: int = 20,
        prior: float = 2.0,
        decay: float = 1.0,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(
                f"AcceptanceCalibrator: num_bins must be an integer >= 1, got {num_bins!r}"
            )
        if not (math.isfinite(prior) and prior > 0):
            raise ValueError(f"AcceptanceCalibrator: prior must be > 0, got {prior!r}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"AcceptanceCalibrator: decay must be in (0, 1], got {decay!r}")
        self.num_bins = num_bins
        self.prior = float(prior)
        self.decay = float(decay)
        self._centres = (np.arange(num_bins, dtype=np.float64) + 0.5) / num_bins
        self.observed = np.zeros(num_bins, dtype=np.float64)
        self.accepted = np.zeros(num_bins, dtype=np.float64)
        # Rebuilt after each update (every draft step reads the table; the counts change once
        # per engine step): (estimates float32, log estimates float32) on the host, as numpy
        # arrays and as Python lists (one-row lookups), and the same on a device when asked.
        self._host: tuple[np.ndarray, np.ndarray, list[float]] | None = None
        self._device: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    @property
    def centres(self) -> torch.Tensor:
        """Each bin's centre, float64 [num_bins]."""
        return torch.from_numpy(self._centres.copy())

    def bins(self, confidence: torch.Tensor) -> torch.Tensor:
        """The bin of each confidence (int64, same shape); values outside [0, 1] are clamped."""
        return (confidence.double() * self.num_bins).floor().long().clamp(0, self.num_bins - 1)

    def estimates_host(self) -> np.ndarray:
        """The acceptance estimate of each bin, float64 numpy [num_bins], in (0, 1)."""
        return (self.prior * self._centres + self.accepted) / (self.prior + self.observed)

    def estimates(self) -> torch.Tensor:
        """The acceptance estimate of each bin, float64 [num_bins], in (0, 1)."""
        return torch.from_numpy(self.estimates_host())

    def _host_table(self) -> tuple[np.ndarray, np.ndarray, list[float]]:
        if self._host is None:
            estimates = self.estimates_host()
            log_table = np.log(estimates).astype(np.float32)
            self._host = (estimates.astype(np.float32), log_table, log_table.tolist())
        return self._host

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._device is None or self._device[0] != device:
            table, log_table, _ = self._host_table()
            self._device = (device, host_to_device(torch.from_numpy(table), device),
                            host_to_device(torch.from_numpy(log_table), device))
        return self._device[1], self._device[2]

    def acceptance(self, confidence: torch.Tensor) -> torch.Tensor:
        """The estimated acceptance probability for each confidence (float32, same shape)."""
        return self._table(confidence.device)[0][self.bins(confidence).to(confidence.device)]

    def log_acceptance(self, confidence: torch.Tensor) -> torch.Tensor:
        """log of `acceptance(confidence)` (float32, same shape)."""
        return self._table(confidence.device)[1][self.bins(confidence).to(confidence.device)]

    def host_bins(self, confidence: np.ndarray) -> np.ndarray:
        """`bins` of numpy confidences (int64): floor(c * num_bins) clamped to [0, num_bins - 1],
        NaN to 0, as the torch version gives."""
        scaled = np.fmax(confidence.astype(np.float64) * self.num_bins, 0.0)  # fmax: NaN -> 0
        return np.minimum(scaled, self.num_bins - 1).astype(np.int64)  # >= 0: truncation = floor

    def bin_of(self, confidence: float) -> int:
        """`host_bins` of one confidence (a Python float)."""
        scaled = confidence * self.num_bins
        if not scaled > 0.0:  # NaN too
            return 0
        return int(min(scaled, self.num_bins - 1))

    def log_acceptance_host(self, confidence: np.ndarray) -> np.ndarray:
        """`log_acceptance` of numpy confidences (float32, same shape), from the same table."""
        return self._host_table()[1][self.host_bins(confidence)]

    def log_acceptance_of(self, confidence: float) -> float:
        """`log_acceptance` of one confidence, as a Python float (a float32 value)."""
        return self._host_table()[2][self.bin_of(confidence)]

    def update_host(self, confidence: np.ndarray, accepted: np.ndarray) -> None:
        """Add observed tokens (numpy): their confidences and whether verification accepted each."""
        if confidence.shape != accepted.shape:
            raise ValueError(
                f"confidence and accepted must have one shape, got {confidence.shape} and {accepted.shape}"
            )
        bins = self.host_bins(confidence.reshape(-1))
        observed = np.bincount(bins, minlength=self.num_bins).astype(np.float64)
        accepted_counts = np.bincount(bins, weights=accepted.reshape(-1).astype(np.float64),
                                      minlength=self.num_bins)
        self.observed = self.observed * self.decay + observed
        self.accepted = self.accepted * self.decay + accepted_counts
        self._host = self._device = None

    def update_one(self, confidence: Sequence[float], num_accepted: int) -> None:
        """`update_from_verification_host` of one draft, from Python values: `confidence` of
        its drafted positions (float32 values), `num_accepted` of them accepted (clamped)."""
        if self.decay != 1.0:
            self.observed = self.observed * self.decay
            self.accepted = self.accepted * self.decay
        observed, accepted = self.observed, self.accepted
        drafted = len(confidence)
        num_accepted = min(max(num_accepted, 0), drafted)
        for i in range(min(num_accepted + 1, drafted)):  # the accepted prefix and the rejection
            b = self.bin_of(confidence[i])
            observed[b] += 1.0
            if i < num_accepted:
                accepted[b] += 1.0
        self._host = self._device = None

    def update_from_verification_host(
        self, confidence: np.ndarray, draft_lengths: np.ndarray, num_accepted: np.ndarray
    ) -> None:
        """`update_from_verification` from numpy arrays ([R, K], [R], [R])."""
        if confidence.ndim != 2 or confidence.shape[0] != draft_lengths.shape[0]:
            raise ValueError(
                f"confidence must be [R, K] with R = {draft_lengths.shape[0]} drafts, "
                f"got {confidence.shape}"
            )
        position = np.arange(confidence.shape[1])[None, :]
        lengths = np.minimum(draft_lengths.astype(np.int64), confidence.shape[1])[:, None]
        accepted_count = np.minimum(num_accepted.astype(np.int64)[:, None], lengths)
        accepted = position < accepted_count
        observed = accepted | ((position == accepted_count) & (position < lengths))
        self.update_host(confidence[observed], accepted[observed])

    def update(self, confidence: torch.Tensor, accepted: torch.Tensor) -> None:
        """Add observed tokens: their confidences and whether verification accepted each."""
        if confidence.shape != accepted.shape:
            raise ValueError(
                f"confidence and accepted must have one shape, got {tuple(confidence.shape)} "
                f"and {tuple(accepted.shape)}"
            )
        self.update_host(confidence.detach().cpu().numpy(), accepted.detach().cpu().numpy())

    def update_from_verification(
        self, confidence: torch.Tensor, draft_lengths: torch.Tensor, num_accepted: torch.Tensor
    ) -> None:
        """Update from one verification step: confidence [R, K] of each drafted position,
        the number of tokens each request drafted and the number verification accepted ([R])."""
        if confidence.dim() != 2 or confidence.shape[0] != draft_lengths.shape[0]:
            raise ValueError(
                f"confidence must be [R, K] with R = {draft_lengths.shape[0]} drafts, "
                f"got {tuple(confidence.shape)}"
            )
        observed, accepted = verification_outcomes(draft_lengths, num_accepted, confidence.shape[1])
        self.update(confidence[observed], accepted[observed])


def build_stop_rule(
    config: AdaptiveDraftConfig, calibrator: AcceptanceCalibrator | None = None
) -> StopRule:
    """The stop rule a validated config names; SpecDec++ needs the engine's calibrator."""
    if config.stop_rule == "none":
        return NoStopRule()
    if config.stop_rule == "entropy":
        return EntropyStopRule(threshold=config.entropy_threshold)
    if config.stop_rule == "adaedl":
        return AdaEDLStopRule(
            gamma=config.adaedl_gamma,
            lam=config.adaedl_lambda,
            adapt=config.adaedl_adapt,
            target_acceptance=config.adaedl_target_acceptance,
            step=config.adaedl_step,
            beta1=config.adaedl_beta1,
            beta2=config.adaedl_beta2,
        )
    if calibrator is None:
        raise ValueError("the specdec stop rule needs an AcceptanceCalibrator")
    threshold = config.specdec_threshold
    if threshold == AUTO:  # the policy updates it from the measured cost ratio each step
        threshold = threshold_for_cost_ratio(config.draft_cost_ratio or DEFAULT_DRAFT_COST_RATIO)
    return SpecDecStopRule(threshold=float(threshold), calibrator=calibrator, confidence=config.confidence)


def threshold_for_cost_ratio(ratio: float) -> float:
    """SpecDec++'s threshold for a draft cost ratio r: theta = 1 - r (r clamped to [0.01, 0.99]):
    a draft goes on while the estimated probability that all of it is accepted is at least r."""
    return 1.0 - min(max(float(ratio), 0.01), 0.99)


def build_calibrator(
    config: AdaptiveDraftConfig, device: torch.device | str | None = None
) -> AcceptanceCalibrator:
    return AcceptanceCalibrator(
        num_bins=config.calibration_bins,
        prior=config.calibration_prior,
        decay=config.calibration_decay,
        device=device,
    )
