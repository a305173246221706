"""Mirostat v2 (Basu et al. 2021, "Mirostat: a neural text decoding algorithm that directly
controls perplexity"), with llama.cpp's semantics.

State mu starts at 2 * tau (bits). Each step keeps the tokens whose surprise -log2 p is at most
mu (the top token always), samples from the renormalised kept set, and then moves mu by
eta * (tau - observed surprise), the surprise measured on the renormalised distribution.

Parameters (shared with mirostat_v1, whose module reuses them): mirostat_tau, the target
surprise in bits, in (0, 40], default 5.0; mirostat_eta, the learning rate of mu, in (0, 1],
default 0.1 (llama.cpp's defaults).

Keeping `-log2 p <= mu` is the same as keeping `logit >= logsumexp(logits) - mu * ln 2`, so the
keep-set is one threshold per row: O(V), no sort. `keep_set_reference` is the sort-based form
(llama.cpp's loop) that tests hold the threshold form to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from vllm_adaptive.sampling.batch_rows import check_batch, in_row_chunks, selected, write_rows_
from vllm_adaptive.sampling.definition import STATE_KEY, SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam

LN2 = math.log(2.0)

TAU = NumberParam(
    "mirostat_tau", 0.0, 40.0, low_open=True, default=5.0, meaning="target surprise (bits)"
)
ETA = NumberParam(
    "mirostat_eta", 0.0, 1.0, low_open=True, default=0.1, meaning="learning rate of mu"
)


def initial_mu(tau: float) -> float:
    return 2.0 * tau


def keep_threshold(logits: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Per-row logit threshold [R] for logits [R, V] and mu [R] (bits).

    Never above the row maximum, so the top token is always kept.
    """
    lse = torch.logsumexp(logits, dim=-1)
    row_max = logits.amax(dim=-1)
    return torch.minimum(lse - mu * LN2, row_max)


def apply_keep_set_(
    logits: torch.Tensor, mu: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask, in place, every token outside each selected row's keep-set to -inf.

    Returns the logsumexp of each selected row's kept logits [K]: the normaliser of the
    renormalised distribution, needed later to measure the surprise of the token that gets
    sampled. Rows whose logits are all -inf are left as they are (their normaliser is -inf).
    One exponential pass serves both normalisers (`keep_threshold`'s lse and the kept one).

    Off CUDA the selected rows go through in chunks (`batch_rows.in_row_chunks`), so the
    step's working memory (the rows' weights and drop mask, 5 bytes per logit) is a few MiB
    whatever the batch and vocabulary, not 1.25x the logits.
    """
    check_batch("mirostat_v2", logits, rows, mu=mu)
    kept_lse = in_row_chunks(_apply_keep_set_rows_, logits, rows, mu)
    assert kept_lse is not None
    return kept_lse


def _apply_keep_set_rows_(
    logits: torch.Tensor, mu: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    """`apply_keep_set_` of the selected rows in one pass."""
    sub = selected(logits, rows)
    row_max = sub.amax(dim=-1)
    shift = torch.where(row_max > float("-inf"), row_max, 0.0)
    weights = (sub - shift.unsqueeze(-1)).exp_()  # 0 for -inf logits
    lse = shift + weights.sum(dim=-1).log()
    threshold = torch.minimum(lse - mu * LN2, row_max)
    drop = sub < threshold.unsqueeze(-1)
    kept_lse = shift + weights.masked_fill_(drop, 0.0).sum(dim=-1).log()
    if rows is None:
        logits.masked_fill_(drop, float("-inf"))
    else:
        sub.masked_fill_(drop, float("-inf"))
        write_rows_(logits, rows, sub, drop.any(dim=-1))
    return kept_lse


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


def _apply(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    return apply_keep_set_(logits, values[STATE_KEY], rows)


def _reference(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    return row.double().masked_fill(~keep_set_reference(row, values[STATE_KEY]), float("-inf"))


DEFINITION = SamplerDefinition(
    name="mirostat_v2",
    summary="Mirostat v2: keep tokens whose surprise is at most mu; mu steers toward tau",
    params=(TAU, ETA),
    apply=_apply,
    reference=_reference,
    stateful=True,
)
