"""Top-n-sigma (Tang et al. 2024, "Top-nσ: Not All Logits Are You Need", arXiv 2411.07641), with
the semantics of llama.cpp's `llama_sampler_top_n_sigma`.

Keep every token whose logit is at least max - n * sigma, where max and sigma are the largest
logit and the population standard deviation (divide by the count) of the row's finite logits;
`-inf` entries are masked tokens and take no part. The top token is always kept (n * sigma >= 0),
ties with the threshold are kept. Dividing logits by a temperature scales max and sigma alike, so
the kept set does not depend on the temperature.

Parameter: top_n_sigma = n in (0, 100]; llama.cpp's usual value 1.0 is the default. n <= 0 leaves
a row as it is (llama.cpp: off).

Threshold form: one pass of `row_stats` (max, mean, std) and `threshold_mask_`: O(V) per row.
`keep_set_reference` is the definition token by token, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from vllm_adaptive.kernels.row_stats import RowStats, row_stats
from vllm_adaptive.kernels.threshold_mask import threshold_mask_
from vllm_adaptive.sampling.batch_rows import check_batch, in_row_chunks
from vllm_adaptive.sampling.definition import SamplerDefinition
from vllm_adaptive.sampling.param_spec import NumberParam

N = NumberParam(
    "top_n_sigma", 0.0, 100.0, low_open=True, default=1.0,
    meaning="keep logits within this many standard deviations of the largest",
)


def keep_threshold(stats: RowStats, n: torch.Tensor) -> torch.Tensor:
    """Per-row logit threshold [K]: max - n * std, or -inf where n <= 0."""
    threshold = stats.row_max - n.float() * stats.std
    return torch.where(n > 0, threshold, float("-inf"))


def apply_top_n_sigma_(
    logits: torch.Tensor, n: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask tokens below max - n * std to -inf in place, on `rows` (every row when None).
    Off CUDA in chunks of rows (`batch_rows.in_row_chunks`)."""
    check_batch("apply_top_n_sigma_", logits, rows, n=n)
    in_row_chunks(_apply_rows_, logits, rows, n)
    return logits


def _apply_rows_(logits: torch.Tensor, n: torch.Tensor, rows: torch.Tensor | None) -> None:
    stats = row_stats(logits, rows, fields=("row_max", "std"))
    threshold_mask_(logits, keep_threshold(stats, n), rows)


def keep_set_reference(logits: torch.Tensor, n: float) -> torch.Tensor:
    """The definition for one row [V]: bool mask of the tokens kept (-inf entries never are)."""
    values = [v for v in logits.double().tolist() if v != float("-inf")]
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    if not values:
        return keep
    top = max(values)
    mean = sum(values) / len(values)
    sigma = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    for i, v in enumerate(logits.double().tolist()):
        keep[i] = v != float("-inf") and (n <= 0 or v >= top - n * sigma)
    return keep


def _apply(
    logits: torch.Tensor,
    values: Mapping[str, torch.Tensor],
    t0: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> None:
    apply_top_n_sigma_(logits, values["top_n_sigma"], rows)


def _reference(row: torch.Tensor, values: Mapping[str, float], t0: float) -> torch.Tensor:
    return row.double().masked_fill(~keep_set_reference(row, values["top_n_sigma"]), float("-inf"))


DEFINITION = SamplerDefinition(
    name="top_n_sigma",
    summary="top-n-sigma: keep logits at least max - n * std",
    params=(N,),
    apply=_apply,
    reference=_reference,
)

NAME = DEFINITION.name
PARAMS = DEFINITION.params
TOP_N_SIGMA_DEFAULT = N.default
