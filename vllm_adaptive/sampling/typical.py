"""Locally typical sampling (Meister, Pimentel, Wiher & Cotterell 2022, "Locally Typical
Sampling", TACL; arXiv 2202.00666), with the semantics of Hugging Face transformers'
`TypicalLogitsWarper` (min_tokens_to_keep=1).

Score each token by how far its surprise is from the entropy, |-ln p - H| (nats); take tokens in
increasing score until their probability mass reaches typical_p (the first position where the
cumulative mass >= typical_p, as HF; llama.cpp's loop uses > instead); keep every token whose
score is at most the score of the token reached, so ties in score are kept or dropped together.

One deviation from HF, required by this project's samplers: the top token (every token tied with
the largest logit) is always kept as well, so the sampler never removes the argmax. HF instead
keeps at least the most typical token, and the paper's set may exclude the argmax. Adding it can
only raise the kept mass above typical_p.

Parameter: typical_p in (0, 1]; 1.0 leaves rows as they are. HF and llama.cpp default to 1.0
(the stage is off until set); here choosing the sampler is the opt-in, so the default is 0.95,
the value Meister et al. use for abstractive summarization (they use 0.2 for story generation).

Why a sort: the cut is a mass quantile in the order of the score, and that order is not the order
of the logits (tokens more probable than typical are dropped too: the kept set is an interval
|logit - (lse - H)| <= r around the typical logit), so no single logit threshold from row
statistics gives it. Finding r is a weighted selection: a sort, O(V log V), as here and in HF,
or a bisection on r with O(V) work per step (exact only up to its iteration count). The sort is
one batched torch call on either device; the statistics (lse, entropy, max) come from
`row_stats`. `keep_set_reference` is the definition token by token, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from vllm_adaptive.kernels.row_stats import row_stats
from vllm_adaptive.sampling.batch_rows import check_batch, selected, write_rows_
from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam

TYPICAL_P = NumberParam(
    "typical_p", 0.0, 1.0, low_open=True, default=0.95,
    meaning="probability mass of the most typical tokens kept (1: off)",
)


def typical_remove_mask(sub: torch.Tensor, typical_p: torch.Tensor) -> torch.Tensor:
    """Bool [K, V]: the tokens of rows `sub` [K, V] that typical sampling drops.

    Rows with typical_p >= 1 or no finite logit drop nothing.
    """
    stats = row_stats(sub)
    active = (typical_p < 1.0) & (stats.count > 0)
    # -ln p - H; -inf logits score +inf and sort last.
    scores = (stats.lse.unsqueeze(-1) - sub - stats.entropy.unsqueeze(-1)).abs()
    sorted_scores, order = torch.sort(scores, dim=-1, stable=True)
    probs = torch.exp(sub.gather(-1, order) - stats.lse.unsqueeze(-1))
    # float64 running sum: over 10^5 tokens a float32 one can drift past typical_p.
    cumulative = probs.double().cumsum(dim=-1)
    reached = (cumulative < typical_p.double().unsqueeze(-1)).sum(dim=-1)
    reached = reached.clamp(max=sub.shape[-1] - 1)
    cut = sorted_scores.gather(-1, reached.unsqueeze(-1))
    remove = (scores > cut) & (sub < stats.row_max.unsqueeze(-1))
    return remove & active.unsqueeze(-1)


def apply_typical_(
    logits: torch.Tensor, typical_p: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask the atypical tokens to -inf in place, on `rows` (every row when None)."""
    check_batch("apply_typical_", logits, rows, typical_p=typical_p)
    active = typical_p < 1.0
    if not bool(active.any()):
        return logits
    sub = selected(logits, rows)
    remove = typical_remove_mask(sub, typical_p)
    if rows is None:
        return logits.masked_fill_(remove, float("-inf"))
    write_rows_(logits, rows, sub.masked_fill_(remove, float("-inf")), remove.any(dim=-1))
    return logits


def keep_set_reference(logits: torch.Tensor, typical_p: float) -> torch.Tensor:
    """The definition for one row [V]: bool mask of the tokens kept (-inf entries never are)."""
    values = logits.double().tolist()
    finite = [i for i, v in enumerate(values) if v != float("-inf")]
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    if not finite:
        return keep
    if typical_p >= 1.0:
        keep[finite] = True
        return keep
    top = max(values[i] for i in finite)
    lse = top + math.log(sum(math.exp(values[i] - top) for i in finite))
    prob = {i: math.exp(values[i] - lse) for i in finite}
    entropy = -sum(p * math.log(p) for p in prob.values() if p > 0.0)
    score = {i: abs(lse - values[i] - entropy) for i in finite}
    by_score = sorted(finite, key=lambda i: score[i])
    cut = score[by_score[-1]]
    mass = 0.0
    for i in by_score:
        mass += prob[i]
        if mass >= typical_p:
            cut = score[i]
            break
    for i in finite:
        keep[i] = score[i] <= cut or values[i] == top
    return keep


def _apply(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    apply_typical_(logits, values["typical_p"], rows)


def _reference(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    return row.double().masked_fill(~keep_set_reference(row, values["typical_p"]), float("-inf"))


DEFINITION = SamplerDefinition(
    name="typical",
    summary="locally typical sampling: keep the tokens whose surprise is closest to the entropy",
    params=(TYPICAL_P,),
    apply=_apply,
    reference=_reference,
    identity={"typical_p": 1.0},
    min_kept_mass="typical_p",
)

NAME = DEFINITION.name
PARAMS = DEFINITION.params
TYPICAL_P_DEFAULT = TYPICAL_P.default
