"""A plain decoder for KV compaction's exactness tests: transformers' Llama, greedy, one token at
a time, whose cache is cut to the kept tokens at the moments the compaction rule says.

Written from the rule, not from vllm_adaptive.kvcache: the budget of a request with `kv_budget`
B tokens (fixed) is max(B, sinks + 1); it is compacted once its prompt (P tokens) is cached, if
the budget is below P, and again whenever the cache holds budget + buffer tokens before a new
token is computed. New tokens keep their true positions (RoPE), whatever the cache holds. Which
tokens each layer and KV head keeps (its policy):

- `streaming`: the first `sinks` tokens of the cache and its last budget - sinks;
- `snapkv`: the first `sinks`, the last `window`, and between them the tokens with the highest
  pooled score, ties to the earlier token. A token's score is the attention probability it got
  from the queries of the last min(window, tokens added since the last compaction) tokens,
  summed over those queries and over the KV head's query heads, as transformers' eager
  attention reports it (`output_attentions`), then max-pooled over a centred window of
  `pool` tokens (cut at the ends);
- `h2o`: the same, scored (without pooling) by the attention probability each cached token got
  from every query the request ran since its (re)computation started, summed over the KV head's
  query heads; a kept token keeps its sum, the evicted ones' sums are gone;
- `keynorm`: the same, scored by minus the L2 norm of each cached key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _keep_rows(cache: object, rows: list[int]) -> None:
    index = torch.tensor(rows, dtype=torch.long)
    for layer in cache.layers:  # transformers' DynamicCache: keys/values [batch, kv_heads, tokens, dim]
        layer.keys = layer.keys.index_select(2, index)
        layer.values = layer.values.index_select(2, index)


def _keep_per_head(cache: object, kept: list[torch.Tensor]) -> None:
    for layer, rows in zip(cache.layers, kept):  # rows [kv_heads, budget]
        index = rows[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
        layer.keys = torch.gather(layer.keys, 2, index)
        layer.values = torch.gather(layer.values, 2, index)


def _max_pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    half = kernel // 2
    length = scores.shape[1]
    return torch.stack([scores[:, max(0, t - half): t + half + 1].max(dim=1).values for t in range(length)], dim=1)


def _select(scores: torch.Tensor, length: int, budget: int, sinks: int, recent: int) -> torch.Tensor:
    """[kv_heads, budget]: sinks, the best-scoring middle tokens (ties to the earlier), recent."""
    first, last = min(sinks, budget), min(recent, budget - min(sinks, budget))
    middle = budget - first - last
    rows = []
    for head in scores.tolist():
        candidates = list(range(first, length - last))
        best = sorted(candidates, key=lambda t: (-head[t], t))[:middle]
        rows.append([*range(first), *sorted(best), *range(length - last, length)])
    return torch.tensor(rows, dtype=torch.long)


def _window_mass(rows: list[tuple[torch.Tensor, ...]], length: int, window: int, kv_heads: int) -> list[torch.Tensor]:
    """Per layer [kv_heads, length]: the summed attention of the last `window` recorded query rows
    (each row: per layer [q_heads, keys seen] probabilities)."""
    recent = rows[-window:]
    layers = []
    for layer in range(len(recent[0])):
        mass = torch.zeros(recent[0][layer].shape[0], length, dtype=torch.float64)
        for row in recent:
            probs = row[layer].double()
            mass[:, : probs.shape[1]] += probs
        layers.append(mass.reshape(kv_heads, -1, length).sum(dim=1))
    return layers


def compacted_greedy(model_dir: Path, prompts: Sequence[Sequence[int]], max_tokens: int,
                     budgets: Sequence[int | None], sinks: int, buffer: int,
                     preempted_at: Sequence[Sequence[int]] | None = None,
                     policies: Sequence[str] | None = None, window: int = 8, pool: int = 7) -> list[list[int]]:
    """Greedy tokens of each prompt; `budgets[i]` None: never compacted. `preempted_at[i]`: the
    numbers of generated tokens at which request i was preempted: its cache is dropped there and
    rebuilt by one prefill of prompt + every generated token (as vLLM recomputes a preempted
    request), and its budget is fixed again from that length. `policies[i]` (default streaming):
    the selection (module docstring)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    kv_heads = model.config.num_key_value_heads
    results = []
    preemptions = preempted_at or [()] * len(prompts)
    with torch.no_grad():
        for prompt, tokens_kept, preempted, policy in zip(prompts, budgets, preemptions,
                                                          policies or ["streaming"] * len(prompts)):
            scored = policy != "streaming"

            def grouped(probs: torch.Tensor) -> torch.Tensor:  # [q_heads, T] -> [kv_heads, T], float64
                return probs.double().reshape(kv_heads, -1, probs.shape[-1]).sum(dim=1)

            def prefill(ids: list[int]) -> tuple[object, int, list[tuple[torch.Tensor, ...]]]:
                nonlocal heavy
                out = model(input_ids=torch.tensor([ids]), use_cache=True, output_attentions=scored)
                rows = []
                if policy == "snapkv":  # each position's attention row, per layer
                    rows = [tuple(a[0, :, i, : i + 1] for a in out.attentions) for i in range(len(ids))]
                if policy == "h2o":  # every query's attention, summed, per layer
                    heavy = [grouped(a[0].sum(dim=1)) for a in out.attentions]
                return out.past_key_values, int(out.logits[0, -1].argmax()), rows

            heavy: list[torch.Tensor] = []

            cache, first, rows = prefill(list(prompt))
            generated = [first]
            logical = physical = len(prompt)

            def budget_for(length: int) -> int | None:
                return None if tokens_kept is None else max(tokens_kept, sinks + 1)

            budget = budget_for(len(prompt))
            compacted_once = False
            while len(generated) < max_tokens:
                if len(generated) in preempted:
                    cache, token, rows = prefill([*prompt, *generated])
                    logical = physical = len(prompt) + len(generated)
                    budget, compacted_once = budget_for(physical), False
                    generated.append(token)
                    continue
                if budget is not None:
                    due = budget < physical if not compacted_once else physical >= budget + buffer
                    compacted_once = True
                    if due and not scored:
                        _keep_rows(cache, [*range(sinks), *range(physical - (budget - sinks), physical)])
                    elif due:
                        if policy == "snapkv":
                            masses = _window_mass(rows, physical, window, kv_heads)
                        elif policy == "h2o":
                            masses = heavy
                        else:
                            masses = [-torch.linalg.vector_norm(layer.keys[0].double(), dim=-1) for layer in cache.layers]
                        kept = [_select(_max_pool(m, pool) if policy == "snapkv" else m, physical, budget, sinks, window)
                                for m in masses]
                        _keep_per_head(cache, kept)
                        heavy = [m.gather(1, k) for m, k in zip(heavy, kept)] if policy == "h2o" else heavy
                        rows = []
                    if due:
                        physical = budget
                out = model(input_ids=torch.tensor([[generated[-1]]]), position_ids=torch.tensor([[logical]]),
                            attention_mask=torch.ones(1, physical + 1, dtype=torch.long),
                            past_key_values=cache, use_cache=True, output_attentions=scored)
                if policy == "snapkv":
                    rows.append(tuple(a[0, :, 0, :] for a in out.attentions))
                if policy == "h2o":
                    heavy = [torch.cat([m, torch.zeros(kv_heads, 1, dtype=m.dtype)], dim=1) + grouped(a[0, :, 0, :])
                             for m, a in zip(heavy, out.attentions)]
                cache = out.past_key_values
                logical += 1
                physical += 1
                generated.append(int(out.logits[0, -1].argmax()))
            results.append(generated)
    return results
