"""Epsilon and eta sampling (Hewitt, Manning & Liang 2022, "Truncation Sampling as Language Model
Desmoothing", arXiv 2210.15191), with the semantics of Hugging Face transformers'
`EpsilonLogitsWarper` and `EtaLogitsWarper` (min_tokens_to_keep=1).

- epsilon: drop every token with probability p < epsilon.
- eta_cutoff (eta): drop every token with p < min(eta, sqrt(eta) * exp(-H)), H the entropy (nats)
  of the distribution, so a flat (high-entropy) distribution is cut less.
- The top token is always kept (every token tied with the largest logit, as HF's top-1 guard).

Two samplers share this module: `epsilon` (parameter `epsilon`) and `eta` (parameter
`eta_cutoff`). The batched function takes both cutoffs per row, 0 switching one off (both 0:
rows untouched); each sampler passes its own and 0 for the other. With both set, both would be
measured on the same distribution and a token dropped when either cutoff drops it.

Ranges: epsilon and eta_cutoff in (0, 1), as HF accepts. HF has no default (the warper is off
unless set); ours are 3e-4 for both, the low end of the range HF's documentation suggests for
each (epsilon 3e-4 to 9e-4, eta 3e-4 to 2e-3), so picking the sampler alone truncates gently.

Threshold form: p < c is logit < lse + ln c, so each row's keep-set is one logit threshold from
`row_stats` (lse, entropy, max), applied by `threshold_mask_`: O(V) per row, no sort.
`keep_set_reference` is the definition token by token, in float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import torch

from vllm_adaptive.kernels.row_stats import RowStats, row_stats
from vllm_adaptive.kernels.threshold_mask import threshold_mask_
from vllm_adaptive.sampling.batch_rows import check_batch, in_row_chunks
from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam

EPSILON = NumberParam(
    "epsilon", 0.0, 1.0, low_open=True, high_open=True, default=3e-4,
    meaning="drop tokens with probability below epsilon",
)
ETA_CUTOFF = NumberParam(
    "eta_cutoff", 0.0, 1.0, low_open=True, high_open=True, default=3e-4,
    meaning="drop tokens with probability below min(eta, sqrt(eta) * exp(-entropy))",
)


def keep_threshold(
    stats: RowStats, epsilon: torch.Tensor, eta_cutoff: torch.Tensor
) -> torch.Tensor:
    """Per-row logit threshold [K]; -inf where both cutoffs are 0; never above the row max."""
    # ln(0) = -inf switches a cutoff off without a branch.
    log_eps = torch.log(epsilon.float())
    log_eta = torch.log(eta_cutoff.float())
    # Without the entropy (no row uses eta: see apply_epsilon_eta_) the eta cut is ln 0 = -inf.
    entropy = stats.entropy if stats.entropy is not None else torch.zeros_like(log_eta)
    log_eta_cut = torch.minimum(log_eta, 0.5 * log_eta - entropy)
    threshold = stats.lse + torch.maximum(log_eps, log_eta_cut)
    return torch.minimum(threshold, stats.row_max)


def apply_epsilon_eta_(
    logits: torch.Tensor,
    epsilon: torch.Tensor,
    eta_cutoff: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask tokens below either cutoff to -inf in place, on `rows` (every row when None).
    Off CUDA in chunks of rows (`batch_rows.in_row_chunks`: bounded working memory, and each
    chunk's passes run on rows still in cache)."""
    check_batch("apply_epsilon_eta_", logits, rows, epsilon=epsilon, eta_cutoff=eta_cutoff)
    # The entropy costs two passes on CPU and only eta reads it (a host read is free there).
    uses_eta = logits.is_cuda or bool((eta_cutoff > 0).any())
    in_row_chunks(functools.partial(_apply_rows_, uses_eta=uses_eta), logits, rows, epsilon, eta_cutoff)
    return logits


def _apply_rows_(
    logits: torch.Tensor, epsilon: torch.Tensor, eta_cutoff: torch.Tensor, rows: torch.Tensor | None,
    uses_eta: bool,
) -> None:
    fields = ("row_max", "lse", "entropy") if uses_eta else ("row_max", "lse")
    stats = row_stats(logits, rows, fields=fields)
    threshold_mask_(logits, keep_threshold(stats, epsilon, eta_cutoff), rows)


def keep_set_reference(logits: torch.Tensor, epsilon: float, eta_cutoff: float) -> torch.Tensor:
    """The definition for one row [V]: bool mask of the tokens kept (-inf entries never are)."""
    x = logits.double()
    probs = torch.softmax(x, dim=-1)
    entropy = 0.0
    for p in probs.tolist():
        if p > 0.0:
            entropy -= p * math.log(p)
    top = x.max().item()
    keep = torch.zeros(x.shape, dtype=torch.bool)
    for i, (logit, p) in enumerate(zip(x.tolist(), probs.tolist())):
        if logit == float("-inf"):
            continue
        dropped = epsilon > 0.0 and p < epsilon
        if eta_cutoff > 0.0:
            dropped = dropped or p < min(eta_cutoff, math.sqrt(eta_cutoff) * math.exp(-entropy))
        keep[i] = logit == top or not dropped
    return keep


def _apply_epsilon(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    epsilon = values["epsilon"]
    apply_epsilon_eta_(logits, epsilon, torch.zeros_like(epsilon), rows)


def _reference_epsilon(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    keep = keep_set_reference(row, values["epsilon"], 0.0)
    return row.double().masked_fill(~keep, float("-inf"))


def _apply_eta(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    eta_cutoff = values["eta_cutoff"]
    apply_epsilon_eta_(logits, torch.zeros_like(eta_cutoff), eta_cutoff, rows)


def _reference_eta(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    keep = keep_set_reference(row, 0.0, values["eta_cutoff"])
    return row.double().masked_fill(~keep, float("-inf"))


EPSILON_DEFINITION = SamplerDefinition(
    name="epsilon",
    summary="epsilon sampling: drop tokens below a fixed probability",
    params=(EPSILON,),
    apply=_apply_epsilon,
    reference=_reference_epsilon,
)

ETA_DEFINITION = SamplerDefinition(
    name="eta",
    summary="eta sampling: drop tokens below a probability that falls with the entropy",
    params=(ETA_CUTOFF,),
    apply=_apply_eta,
    reference=_reference_eta,
)

EPSILON_NAME = EPSILON_DEFINITION.name
ETA_NAME = ETA_DEFINITION.name
EPSILON_PARAMS = EPSILON_DEFINITION.params
ETA_PARAMS = ETA_DEFINITION.params
EPSILON_DEFAULT = EPSILON.default
ETA_CUTOFF_DEFAULT = ETA_CUTOFF.default
