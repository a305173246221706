"""Mirostat v1 (Basu et al. 2021, "Mirostat: a neural text decoding algorithm that directly
controls perplexity", ICLR; Algorithm 1), with llama.cpp's semantics (`llama_sampler_mirostat`).

Parameters: mirostat_tau (target surprise, bits; default 5.0, range (0, 40]), mirostat_eta
(learning rate; default 0.1, range (0, 1]), mirostat_m (how many top tokens estimate the Zipf
exponent; default 100, range [2, 1000], an integer: fractions are truncated). State mu starts at
2 * tau, as in v2.

Each step, for a row sorted by probability p_1 >= p_2 >= ...:
  s   = sum_i t_i b_i / sum_i t_i^2 over i = 1 .. m-1, t_i = ln((i+1)/i), b_i = ln(p_i / p_{i+1})
        (least-squares Zipf exponent of the top m probabilities; b_i is simply the logit gap)
  eps = s - 1
  k   = ((eps * 2^mu) / (1 - N^(-eps)))^(1/s), N the vocabulary size (the row width)
then keep the top max(floor(k), 1) tokens, sample from them renormalised, and move mu exactly as
v2 does (`observed_surprise`, `update_mu`, re-exported here from `mirostat`).

Choices where llama.cpp's float arithmetic is undefined or degenerate (each matches its limit):
- eps = 0 (s = 1): (1 - N^(-eps)) / eps -> ln N, so k = (2^mu / ln N)^(1/s).
- s = 0 (all top-m gaps zero): k is N when 2^mu exceeds (N-1) and 1 otherwise (the C
  powf(x, inf) result), computed through the logarithm.
- Pairs with a -inf logit are left out of s (a masked token is not part of the Zipf fit); a row
  with fewer than two finite logits keeps its top token (k = 1).
- k is clamped to [1, N] before truncating (llama.cpp's int(k) overflows for huge k).
- Top-k in threshold form: keep every token whose logit is at least the k-th largest, so tokens
  tied at the boundary are kept together (llama.cpp's partial sort keeps an arbitrary subset).

The fast path selects the top max(m) logits with `torch.topk` (O(V) selection, no full sort),
computes k for all rows in float64, takes the k-th largest logit as the row's threshold (a
second `topk` only when some k exceeds m), and masks with `threshold_mask_`.
`keep_set_reference` follows llama.cpp's loop on a stably sorted row, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from vllm_adaptive.kernels.row_stats import row_stats
from vllm_adaptive.kernels.threshold_mask import threshold_mask_
from vllm_adaptive.sampling import mirostat
from vllm_adaptive.sampling.batch_rows import check_batch, in_row_chunks, selected
from vllm_adaptive.sampling.definition import STATE_KEY, SamplerDefinition
from vllm_adaptive.sampling.mirostat import initial_mu, observed_surprise, update_mu
from vllm_adaptive.sampling.param_spec import NumberParam

__all__ = [
    "DEFINITION", "NAME", "PARAMS", "MIROSTAT_TAU_DEFAULT", "MIROSTAT_ETA_DEFAULT",
    "MIROSTAT_M_DEFAULT", "initial_mu", "observed_surprise", "update_mu", "keep_k",
    "apply_keep_set_", "keep_k_reference", "keep_set_reference",
]

M = NumberParam(
    "mirostat_m", 2.0, 1000.0, default=100.0,
    meaning="how many top tokens estimate the Zipf exponent (fractions are truncated)",
)

LN2 = math.log(2.0)


def k_from_zipf(s: torch.Tensor, mu: torch.Tensor, vocab: int) -> torch.Tensor:
    """k [K] (int64, in [1, vocab]) from Zipf exponents s [K] and mu [K] (bits), in float64."""
    s = s.double()
    mu = mu.double()
    if vocab < 2:
        return torch.ones(s.shape, dtype=torch.long, device=s.device)
    ln_n = math.log(vocab)
    eps = s - 1.0
    # (1 - N^(-eps)) / eps, with its limit ln N at eps = 0; positive for every eps.
    safe_eps = torch.where(eps == 0, 1.0, eps)
    g = torch.where(eps == 0, ln_n, -torch.expm1(-eps * ln_n) / safe_eps)
    numerator = mu * LN2 - torch.log(g)
    log_k = numerator / s  # s = 0 gives +-inf (or NaN for 0/0, which falls to k = 1 below)
    k = torch.exp(log_k.clamp(max=math.log(vocab) + 1.0)).floor()
    k = torch.where(torch.isnan(k) | torch.isnan(s), 1.0, k)
    return k.clamp(1, vocab).long()


def zipf_exponent(top_logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """s [K] from each row's largest logits [K, M] sorted descending and m [K]; NaN: no pairs."""
    x = top_logits.double()
    gaps = x[:, :-1] - x[:, 1:]  # b_i = ln(p_i / p_{i+1})
    i = torch.arange(1, x.shape[1], dtype=torch.float64, device=x.device)
    t = torch.log((i + 1.0) / i)
    in_fit = i.unsqueeze(0) <= (m.double().floor() - 1.0).unsqueeze(-1)
    valid = in_fit & (x[:, 1:] > float("-inf"))
    num = torch.where(valid, t * gaps, 0.0).sum(dim=-1)
    den = torch.where(valid, t * t, 0.0).sum(dim=-1)
    return num / den


def keep_k(
    logits: torch.Tensor, mu: torch.Tensor, m: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """k [K] (int64) for each selected row, from mu [K] (bits) and m [K]."""
    k, _ = _keep_k_and_top(logits, mu, m, rows)
    return k


def apply_keep_set_(
    logits: torch.Tensor, mu: torch.Tensor, m: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask, in place, every token outside each selected row's top-k to -inf.

    Returns the logsumexp [K] of each selected row's kept logits (the normaliser for
    `observed_surprise`). Rows whose logits are all -inf stay as they are. Off CUDA in chunks
    of rows (`batch_rows.in_row_chunks`): the working memory of the top-k, the mask and the
    normaliser is a few MiB whatever the batch and vocabulary.
    """
    check_batch("mirostat_v1", logits, rows, mu=mu, m=m)
    kept_lse = in_row_chunks(_apply_keep_set_rows_, logits, rows, mu, m)
    assert kept_lse is not None
    return kept_lse


def _apply_keep_set_rows_(
    logits: torch.Tensor, mu: torch.Tensor, m: torch.Tensor, rows: torch.Tensor | None
) -> torch.Tensor:
    """`apply_keep_set_` of the selected rows in one pass (checked inputs)."""
    k, top = _keep_k_and_top(logits, mu, m, rows)
    vocab = logits.shape[1]
    k_max = int(k.max()) if k.numel() else 1
    if k_max > top.shape[1]:
        top = torch.topk(selected(logits, rows), min(k_max, vocab), dim=-1).values
    threshold = top.gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)
    threshold_mask_(logits, threshold, rows)
    return row_stats(logits, rows, fields=("lse",)).lse


def _keep_k_and_top(
    logits: torch.Tensor, mu: torch.Tensor, m: torch.Tensor, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    k_rows = check_batch("mirostat_v1", logits, rows, mu=mu, m=m)
    vocab = logits.shape[1]
    if k_rows == 0:
        empty = torch.empty((0,), dtype=torch.long, device=logits.device)
        return empty, logits.new_empty((0, 1))
    m_max = min(max(int(m.max()), 2), vocab)
    top = torch.topk(selected(logits, rows), m_max, dim=-1).values
    s = zipf_exponent(top, m)
    return k_from_zipf(s, mu, vocab), top


def keep_k_reference(logits: torch.Tensor, mu: float, m: int) -> int:
    """llama.cpp's k for one row [V]: Zipf fit over the top m probabilities, then the formula."""
    vocab = logits.shape[0]
    if not bool((logits > float("-inf")).any()):
        return 1
    logp = torch.log_softmax(logits.double(), dim=-1)
    order = torch.argsort(logp, descending=True, stable=True).tolist()
    sum_tb = 0.0
    sum_tt = 0.0
    for i in range(min(int(m) - 1, vocab - 1)):
        a, b = logp[order[i]].item(), logp[order[i + 1]].item()
        if b == float("-inf"):
            break
        t = math.log((i + 2) / (i + 1))
        sum_tb += t * (a - b)
        sum_tt += t * t
    if sum_tt == 0.0 or vocab < 2:
        return 1
    s = sum_tb / sum_tt
    eps = s - 1.0
    ratio = 1.0 / math.log(vocab) if eps == 0.0 else eps / (1.0 - vocab ** (-eps))
    base = ratio * 2.0**mu
    if s == 0.0:
        return vocab if base > 1.0 else 1
    try:
        k = base ** (1.0 / s)
    except OverflowError:
        k = math.inf
    return int(min(max(k, 1.0), vocab))


def keep_set_reference(logits: torch.Tensor, mu: float, m: int) -> torch.Tensor:
    """Bool mask [V] of the tokens one row keeps: logit >= its k-th largest logit, never -inf."""
    k = keep_k_reference(logits, mu, m)
    kth = torch.sort(logits.double(), descending=True).values[k - 1].item()
    return (logits.double() >= kth) & (logits > float("-inf"))


def _apply(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    return apply_keep_set_(logits, values[STATE_KEY], values["mirostat_m"], rows)


def _reference(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    keep = keep_set_reference(row, values[STATE_KEY], int(values["mirostat_m"]))
    return row.double().masked_fill(~keep, float("-inf"))


DEFINITION = SamplerDefinition(
    name="mirostat_v1",
    summary="Mirostat v1: keep the top k tokens, k from a Zipf fit and mu; mu steers toward tau",
    params=(mirostat.TAU, mirostat.ETA, M),
    apply=_apply,
    reference=_reference,
    stateful=True,
)

NAME = DEFINITION.name
PARAMS = DEFINITION.params
MIROSTAT_TAU_DEFAULT = mirostat.TAU.default
MIROSTAT_ETA_DEFAULT = mirostat.ETA.default
MIROSTAT_M_DEFAULT = int(M.default)  # type: ignore[arg-type]
