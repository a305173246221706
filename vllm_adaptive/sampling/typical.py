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

Why no single threshold: the cut is a mass quantile in the order of the score, and that order is
not the order of the logits (tokens more probable than typical are dropped too: the kept set is
an interval |logit - (lse - H)| <= r around the typical logit). Finding r is a weighted
selection. Two exact ways, one result:
- "sort" (CUDA): sort the scores, cumulative mass in float64, first position reaching
  typical_p; O(V log V), one batched call with no host read, as HF does.
- "bins" (CPU, no full sort): each row's scores go into BINS equal-width bins over [0, its
  largest finite score] (a bin number never decreases as the score grows, so the bins are in
  score order); one index-add over the batch gives each bin's mass (float32, only to find the
  bin where the cumulative mass reaches typical_p), the mass below that bin is then summed
  exactly (torch's pairwise sum), only that bin's tokens are ordered (a `topk` as wide as the
  fullest such bin), and the cut is the score of the token where the running mass, in float64,
  reaches typical_p. A row whose bin the float32 sums misjudged is cut by the sort. About 20
  O(V) passes; the sorting left is one bin per row (a whole row when its scores are all equal).
  It needs the width of that `topk` on the host, a read that would stall a GPU stream: hence
  the sort there. On CPU, at 256 x 131072, the bins took about a third of the sort's time
  (3.1 s against 8.9 s for `typical_remove_mask` on the project's busy 2-core machine).
The statistics (lse, entropy, max) are `row_stats`' formulas, computed here so that the
exponentials become the probabilities and the shifted logits the scores without further passes.
`keep_set_reference` is the definition token by token, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from vllm_adaptive.sampling.batch_rows import check_batch, selected, write_rows_
from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam

TYPICAL_P = NumberParam(
    "typical_p", 0.0, 1.0, low_open=True, default=0.95,
    meaning="probability mass of the most typical tokens kept (1: off)",
)


# Bins of the CPU selection: enough that one bin holds a few hundred of 128k tokens.
BINS = 1024


def typical_remove_mask(
    sub: torch.Tensor, typical_p: torch.Tensor, method: str | None = None
) -> torch.Tensor:
    """Bool [K, V]: the tokens of rows `sub` [K, V] that typical sampling drops.

    Rows with typical_p >= 1 or no finite logit drop nothing. `method` is "sort" or "bins"
    (default: "sort" on CUDA, "bins" elsewhere); both give the same set.
    """
    if method is None:
        method = "sort" if sub.is_cuda else "bins"
    if method not in ("sort", "bins"):
        raise ValueError(f"typical_remove_mask: method must be 'sort' or 'bins', got {method!r}")
    row_max, probs, scores = _probs_and_scores(sub)
    active = (typical_p < 1.0) & (row_max > float("-inf"))
    if method == "sort":
        cut = _cut_by_sort(scores, probs, typical_p)
    else:
        cut = _cut_by_bins(sub, scores, probs, typical_p, active)
    cut = torch.where(active, cut, float("inf"))
    remove = scores > cut.unsqueeze(-1)
    return remove.logical_and_(sub < row_max.unsqueeze(-1))  # the top token always stays


def _probs_and_scores(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row max [K], probabilities [K, V] and scores |-ln p - H| [K, V] of float32 rows.

    The statistics of `row_stats` (same formulas, shifted by the row max), with the
    exponentials kept as the probabilities and the shifted logits turned into the scores in
    place: the fewest passes over the rows. -inf logits get p = 0 and score +inf.
    """
    row_max = sub.amax(dim=-1)
    has_finite = row_max > float("-inf")
    shift = torch.where(has_finite, row_max, 0.0).unsqueeze(-1)
    shifted = sub - shift
    weights = shifted.exp()
    total = weights.sum(dim=-1, keepdim=True)
    log_total = total.log()
    # E_p[x - shift] * total; 0 * -inf is NaN in rows with -inf entries: those rows masked.
    dot = torch.matmul(weights.unsqueeze(-2), shifted.unsqueeze(-1)).view(-1, 1)
    nan = torch.isnan(dot).squeeze(-1)
    if sub.is_cuda or bool(nan.any()):
        dot = torch.linalg.vecdot(weights, shifted.masked_fill(shifted == float("-inf"), 0.0))
        dot = dot.unsqueeze(-1)
    entropy = (log_total - dot / total.clamp(min=torch.finfo(torch.float32).tiny)).clamp(min=0.0)
    # |-ln p - H| = |(x - shift) - (ln total - H)|; rows with nothing finite: centre 0, no NaN.
    centre = torch.where(has_finite.unsqueeze(-1), log_total - entropy, 0.0)
    probs = weights.div_(total.clamp(min=torch.finfo(torch.float32).tiny))
    scores = shifted.sub_(centre).abs_()
    return row_max, probs, scores


def _cut_by_sort(
    scores: torch.Tensor, probs: torch.Tensor, typical_p: torch.Tensor
) -> torch.Tensor:
    """The score [K] of the first token, in score order, where the kept mass reaches typical_p."""
    sorted_scores, order = torch.sort(scores, dim=-1, stable=True)
    # float64 running sum: over 10^5 tokens a float32 one can drift past typical_p.
    cumulative = probs.gather(-1, order).double().cumsum(dim=-1)
    reached = (cumulative < typical_p.double().unsqueeze(-1)).sum(dim=-1)
    reached = reached.clamp(max=scores.shape[-1] - 1)
    return sorted_scores.gather(-1, reached.unsqueeze(-1)).squeeze(-1)


def _cut_by_bins(
    sub: torch.Tensor,
    scores: torch.Tensor,
    probs: torch.Tensor,
    typical_p: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """`_cut_by_sort`'s result without sorting rows: bins in score order, then one bin sorted.

    Rows not `active` (typical_p >= 1, nothing finite) get some cut the caller ignores.
    """
    k, vocab = sub.shape
    if k == 0:
        return scores.new_empty((0,))
    if k * BINS >= 2**24:  # bin numbers are exact in float32 below 2^24: do it in parts
        step = (2**24 - 1) // BINS
        return torch.cat([
            _cut_by_bins(sub[i:i + step], scores[i:i + step], probs[i:i + step],
                         typical_p[i:i + step], active[i:i + step])
            for i in range(0, k, step)
        ])
    # The largest finite score; a score rounded past it lands in the last bin (clamped).
    largest = torch.where(torch.isinf(scores), 0.0, scores).amax(dim=-1) if bool(
        torch.isinf(sub.amin(dim=-1)).any()
    ) else scores.amax(dim=-1)
    scale = torch.where(largest > 0, BINS / largest, 1.0).unsqueeze(-1)
    # Bin number of each token in the whole batch (row r's bins are r * BINS ...): one
    # index_add for every row. Rounding may move a token to the next bin, never out of order
    # or out of its row. +inf scores (-inf logits, p = 0) go to the row's last bin.
    first = torch.arange(0, k * BINS, BINS, device=sub.device).unsqueeze(-1)
    position = torch.addcmul(first.float(), scores, scale)
    index = torch.minimum(position, (first + BINS - 1).float(), out=position).to(torch.int32)
    # Each bin's mass in float32 finds the bin where typical_p is reached; the mass below that
    # bin is then summed exactly (torch's pairwise sum), and a row whose bin the float32 sums
    # misjudged takes the sort.
    mass = torch.zeros(k * BINS, dtype=torch.float32, device=sub.device)
    mass.index_add_(0, index.view(-1), probs.view(-1))
    cumulative = mass.view(k, BINS).double().cumsum(dim=-1)
    target = typical_p.double().unsqueeze(-1)
    bin_reached = (cumulative < target).sum(dim=-1).clamp(max=BINS - 1)
    bin_index = (bin_reached.unsqueeze(-1) + first).to(torch.int32)
    below = probs.masked_fill(index >= bin_index, 0.0).sum(dim=-1).double()
    # Tokens per bin by one count over the batch (a sum of a bool [K, V] costs more).
    per_bin = torch.bincount(index.view(-1), minlength=k * BINS)
    population = per_bin.gather(0, bin_index.view(-1).long())
    width = min(max(int(population.max()), 1), vocab)  # host read: the CPU path
    candidates = scores.masked_fill(index != bin_index, float("inf"))
    bin_scores, order = torch.topk(candidates, width, dim=-1, largest=False, sorted=True)
    real = torch.arange(width, device=sub.device) < population.unsqueeze(-1)
    in_order = torch.where(real, probs.gather(-1, order), 0.0).double()
    running = below.unsqueeze(-1) + in_order.cumsum(dim=-1)
    reached = (running < target).sum(dim=-1)
    cut = bin_scores.gather(-1, reached.clamp(max=width - 1).unsqueeze(-1)).squeeze(-1)
    misjudged = ((below >= target.squeeze(-1)) | (reached >= population)) & active
    if bool(misjudged.any()):
        which = misjudged.nonzero().squeeze(-1)
        cut.index_copy_(0, which, _cut_by_sort(
            scores.index_select(0, which),
            probs.index_select(0, which),
            typical_p.index_select(0, which),
        ))
    return cut


def apply_typical_(
    logits: torch.Tensor, typical_p: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask the atypical tokens to -inf in place, on `rows` (every row when None)."""
    check_batch("apply_typical_", logits, rows, typical_p=typical_p)
    if not logits.is_cuda and not bool((typical_p < 1.0).any()):  # a host read only off CUDA
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
