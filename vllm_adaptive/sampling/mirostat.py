"""Mirostat v2 (Basu et al. 2021, "Mirostat: a neural text decoding algorithm that directly
controls perplexity"), with llama.cpp's semantics.

State mu starts at 2 * tau (bits). Each step keeps the tokens whose surprise -log2 p is at most
mu (the top token always), samples from the renormalised kept set, and then moves mu by
eta * (tau - observed surprise), the surprise measured on the renormalised distribution.

Keeping `-log2 p <= mu` is the same as keeping `logit >= logsumexp(logits) - mu * ln 2`, so the
keep-set is one threshold per row: O(V), no sort. `keep_set_reference` is the sort-based form
(llama.cpp's loop) that tests hold the threshold form to.
"""

from __future__ import annotations

import math

import torch

from vllm_adaptive.sampling.batch_rows import check_batch

LN2 = math.log(2.0)


def initial_mu(tau: float) -> float:
    return 2.0 * tau


def keep_threshold(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Per-row logit threshold [R] for logits [R, V] and mu [R] (bits).

    Never above the row maximum, so the top token is always kept.
    """
    lse = torch.logsumexp(logits, dim=-1)
    row_max = logits.amax(dim=-1)
    return torch.minimum(lse - mu * LN2, row_max)


def apply_keep_set_(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Mask, in place, every token outside each row's keep-set to -inf.

    Returns the logsumexp of each row's kept logits [R]: the normaliser of the renormalised
    distribution, needed later to measure the surprise of the token that gets sampled.
    Rows whose logits are all -inf are left as they are (their normaliser is -inf).
    """
    check_batch("mirostat_v2", logits, None, mu=mu)
    threshold = keep_threshold(logits, mu)
    logits.masked_fill_(logits < threshold.unsqueeze(-1), float("-inf"))
    return torch.logsumexp(logits, dim=-1)


def observed_surprise(token_logit: torch.Tensor, kept_lse: torch.Tensor) -> torch.Tensor:
    """Surprise in bits of sampled tokens under the renormalised kept distribution."""
    return (kept_lse - token_logit) / LN2


def update_mu(mu: float, surprise_bits: float, tau: float, eta: float) -> float:
    return mu - eta * (surprise_bits - tau)


def keep_set_reference(logits: torch.Tensor, mu: float) -> torch.Tensor:
    """llama.cpp's loop for one row [V]: sort by probability, keep while -log2 p <= mu.

    Returns a bool mask [V] of kept tokens. Where llama.cpp keeps its first token whatever mu
    says, this keeps every token tied with the largest logit (the project's "top token" rule:
    ties are decided by value, never by position); ties at the mu boundary are all kept or all
    dropped, as a threshold on p does.
    """
    probs = torch.softmax(logits.double(), dim=-1)
    order = torch.argsort(probs, descending=True, stable=True)
    keep = (logits == logits.max()) & (logits > float("-inf"))
    for idx in order[1:].tolist():
        p = probs[idx].item()
        if p <= 0.0 or -math.log2(p) > mu:
            break
        keep[idx] = True
    return keep
