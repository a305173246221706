"""How many tokens does a compacted request keep, and when is it compacted? (issue #18)

The budget is one count per request (every layer and KV head keeps that many tokens; see
`selection`). Three rules:

- `fixed`: `tokens`, the same for every request;
- `ratio`: ceil(`ratio` x the request's length);
- `entropy`: from how concentrated the observation window's attention is. For each KV head the
  attention mass over the tokens (`kernels.kv_score`), normalised to a distribution p, has an
  entropy H(p) (nats); exp(H) is its effective number of tokens: the number of equally attended
  tokens with the same entropy. The budget is ceil(`multiplier` x the mean effective number over
  the heads (and layers)) plus the sinks and the recent window, which are kept anyway: a request
  whose heads attend to a few tokens is compacted hard, one that attends broadly keeps more. The
  mean, not the largest: one budget serves every head, and a head that attends to everything
  loses little per evicted token (the largest would let one such head veto any compaction).

Every rule's budget is then clamped to [`min_tokens`, length]. `min_tokens` is at least
sinks + recent so that the middle is never the only thing evicted into nothing.

Triggers: a request is compacted once after its prompt's last chunk (when its length exceeds its
budget), and again during decode when its physical length reaches budget + `buffer`, back to
budget: compaction then runs once every `buffer` generated tokens, not at every step.
"""

from __future__ import annotations

import dataclasses
import math

import torch

BUDGET_RULES = ("fixed", "ratio", "entropy")


@dataclasses.dataclass(frozen=True)
class BudgetRule:
    rule: str = "ratio"
    tokens: int = 1024  # fixed
    ratio: float = 0.25  # ratio
    multiplier: float = 2.0  # entropy
    min_tokens: int = 64
    sinks: int = 4
    recent: int = 32
    buffer: int = 128

    def __post_init__(self) -> None:
        if self.rule not in BUDGET_RULES:
            raise ValueError(f"rule must be one of {list(BUDGET_RULES)}, got {self.rule!r}")
        if self.tokens < 1:
            raise ValueError(f"tokens must be an integer >= 1, got {self.tokens}")
        if not (0.0 < self.ratio <= 1.0):
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        if not (math.isfinite(self.multiplier) and self.multiplier > 0):
            raise ValueError(f"multiplier must be > 0, got {self.multiplier}")
        if self.sinks < 0 or self.recent < 0:
            raise ValueError(f"sinks and recent must be >= 0, got {self.sinks} and {self.recent}")
        if self.min_tokens < self.sinks + self.recent:
            raise ValueError(f"min_tokens must be at least sinks + recent = {self.sinks + self.recent}, "
                             f"got {self.min_tokens}")
        if self.buffer < 1:
            raise ValueError(f"buffer must be an integer >= 1, got {self.buffer}")

    def budget(self, length: int, mass: torch.Tensor | None = None, effective: float | None = None) -> int:
        """The tokens a request of `length` tokens keeps; `mass` [H, length] is the observation
        window's attention mass per KV head, or `effective` the mean effective number of
        tokens over its heads (layers included) (the entropy rule needs one of them)."""
        return min(self.target(length, mass, effective), length)

    def target(self, length: int, mass: torch.Tensor | None = None, effective: float | None = None) -> int:
        """`budget` before it is capped at the length: what the request is compacted back to
        during decode, once it holds target + buffer tokens (a fixed budget above the prompt's
        length is only reached later, or never)."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if self.rule == "fixed":
            wanted = self.tokens
        elif self.rule == "ratio":
            wanted = math.ceil(self.ratio * length)
        else:
            if effective is None:
                if mass is None:
                    raise ValueError("the entropy budget rule needs the observation window's attention mass")
                effective = float(effective_tokens(mass).mean())
            if not (math.isfinite(effective) and effective >= 0):
                raise ValueError(f"effective number of tokens must be finite and >= 0, got {effective}")
            wanted = math.ceil(self.multiplier * effective) + self.sinks + self.recent
        return max(wanted, self.min_tokens)

    def compact_after_prompt(self, length: int, budget: int) -> bool:
        """Whether a request whose prompt just finished (`length` tokens) is compacted now."""
        return budget < length

    def compact_during_decode(self, physical_length: int, budget: int) -> bool:
        """Whether a decoding request holding `physical_length` tokens is compacted back to `budget`."""
        return physical_length >= budget + self.buffer


def effective_tokens(mass: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of each row of `mass` [H, P] normalised to sum 1 (float64 [H]); rows without
    mass count as one token (nothing to spread over)."""
    if mass.dim() != 2:
        raise ValueError(f"mass must be [heads, tokens], got {tuple(mass.shape)}")
    m = mass.double().clamp(min=0.0)
    total = m.sum(dim=1, keepdim=True)
    p = torch.where(total > 0, m / total.clamp(min=1e-300), torch.zeros_like(m))
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return torch.exp(-plogp.sum(dim=1))
