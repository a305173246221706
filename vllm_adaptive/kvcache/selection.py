"""Which tokens does a compacted request keep? Scorers and the per-head selection (issue #18).

A request's cache is compacted to one count `budget` of tokens per layer and KV head: vLLM's
block table is shared by every head and layer, so a head keeping fewer tokens than another would
free no memory. Within that count each (layer, KV head) keeps its own
tokens: the `sinks` first ones (attention sinks), the `recent` last ones, and the highest-scoring
tokens between them. Scores are per (KV head, token), higher meaning more important:

- `snapkv`: the attention mass each token receives from the request's last `w` prompt queries
  (the observation window, GQA heads of a KV head summed; kernels/kv_score.py computes it on
  the paged cache), smoothed by a 1-D pooling over neighbouring tokens so that kept tokens come
  with their context (SnapKV, Li et al. 2024, arXiv 2404.14469, pools with a kernel of 5-7).
- `h2o`: the attention mass accumulated over decode steps (heavy hitters, Zhang et al. 2023,
  arXiv 2306.14048): the same kernel with w = 1 adding into a per-request buffer.
- `keynorm`: the negated L2 norm of each key: keys with a low norm draw high attention (Devoto
  et al. 2024, arXiv 2406.11430); needs no queries.
- `streaming`: no scores: the middle is filled with the most recent tokens, i.e. sinks + a
  recent window (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453), the baseline.

Ties break towards the earlier token (a stable sort of the scores), so the same scores always
give the same selection. Indices come back ascending per head, which the compaction kernel needs
(kernels/kv_compact.py: the kept token i moves to slot i <= its old slot).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORERS = ("snapkv", "h2o", "keynorm", "streaming")
POOLINGS = ("max", "avg")


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str = "max") -> torch.Tensor:
    """`scores` [H, P] smoothed over tokens by a centred window of `kernel` (odd) tokens.

    Same shape; the window is cut at the ends (max pooling ignores the padding; average pooling
    averages the tokens inside the sequence only). kernel 1 returns the scores unchanged.
    """
    if scores.dim() != 2:
        raise ValueError(f"pool_scores: scores must be [heads, tokens], got {tuple(scores.shape)}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"pool_scores: kernel must be an odd integer >= 1, got {kernel}")
    if pooling not in POOLINGS:
        raise ValueError(f"pool_scores: pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if kernel == 1 or scores.shape[1] == 0:
        return scores
    x = scores.float().unsqueeze(0)  # [1, H, P]: pooling over the last dimension
    half = kernel // 2
    if pooling == "max":
        return F.max_pool1d(x, kernel, stride=1, padding=half).squeeze(0)
    sums = F.avg_pool1d(x, kernel, stride=1, padding=half, count_include_pad=True) * kernel
    counts = F.avg_pool1d(torch.ones_like(x[:, :1]), kernel, stride=1, padding=half,
                          count_include_pad=True) * kernel
    return (sums / counts).squeeze(0)


def keynorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """Scores [H, P] of keys [H, P, D]: minus each key's L2 norm (computed in float32)."""
    if keys.dim() != 3:
        raise ValueError(f"keynorm_scores: keys must be [heads, tokens, head_size], got {tuple(keys.shape)}")
    return -torch.linalg.vector_norm(keys.float(), dim=-1)


def select_tokens(
    scores: torch.Tensor | None, length: int, budget: int, sinks: int = 4, recent: int = 32,
    num_heads: int | None = None,
) -> torch.Tensor:
    """The tokens each KV head keeps: int64 [H, min(budget, length)], ascending per head.

    `scores` [H, length] (None: the streaming baseline, which then needs `num_heads`). The first
    min(sinks, budget) tokens and the last `recent` tokens (as many as the budget leaves) are
    always kept; the rest of the budget goes to the best-scoring tokens between them.
    """
    if length < 0 or budget < 0 or sinks < 0 or recent < 0:
        raise ValueError(f"select_tokens: length, budget, sinks and recent must be >= 0, got "
                         f"{length}, {budget}, {sinks}, {recent}")
    if scores is not None:
        if scores.dim() != 2 or scores.shape[1] != length:
            raise ValueError(f"select_tokens: scores must be [heads, {length}], got {tuple(scores.shape)}")
        if torch.isnan(scores).any():
            raise ValueError("select_tokens: scores contain NaN")
        num_heads = scores.shape[0]
        device = scores.device
    elif num_heads is None:
        raise ValueError("select_tokens: the streaming baseline (scores None) needs num_heads")
    else:
        device = torch.device("cpu")
    keep = min(budget, length)
    if keep == length:
        return torch.arange(length, device=device).expand(num_heads, length).clone()
    first = min(sinks, keep)
    last = min(recent, keep - first)
    middle = keep - first - last
    head = torch.arange(first, device=device)
    tail = torch.arange(length - last, length, device=device)
    if scores is None or middle == 0:
        # Streaming: the middle's share extends the recent window.
        tail = torch.arange(length - last - middle, length, device=device)
        return torch.cat([head, tail]).expand(num_heads, keep).clone()
    candidates = scores[:, first : length - last].float()
    order = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :middle]
    chosen = torch.sort(order, dim=1).values + first
    return torch.cat([head.expand(num_heads, first), chosen, tail.expand(num_heads, last)], dim=1)
