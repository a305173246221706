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
  from the queries of the last min(window, tokens added since the last compaction + 1) tokens,
  summed over those queries and over the KV head's query heads, then max-pooled over a centred
  window of `pool` tokens (cut at the ends). The earlier queries' probabilities are transformers'
  eager attention's (`output_attentions`); the last query is the token being computed: each
  layer cuts its cache just before its attention runs (a forward pre-hook), from that token's
  query and key in this layer (computed from the layer's input, so layers before it already
  attend to their cut caches) over the cached keys and itself;
- `h2o`: the same, scored (without pooling) by the attention probability each cached token got
  from every query the request ran since its (re)computation started, summed over the KV head's
  query heads; a kept token keeps its sum, the evicted ones' sums are gone;
- `keynorm`: the same, scored by minus the L2 norm of each cached key.
"""

from __future__ import annotations

import math
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


def _snapkv_in_layer(in_layer: dict, kv_heads: int, sinks: int, window: int, pool: int):
    """A forward pre-hook for a Llama attention module: while `in_layer["job"]` is set, cut that
    layer's cache to the SnapKV selection whose window ends with the token being computed (its
    query and key from the layer's input, its attention over the cached keys and itself)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        job = in_layer["job"]
        if job is None:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        shape = (*hidden.shape[:-1], -1, module.head_dim)
        query = module.q_proj(hidden).view(shape).transpose(1, 2)
        key = module.k_proj(hidden).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        layer = job["cache"].layers[module.layer_idx]
        keys = torch.cat([layer.keys, key], dim=2)  # [1, kv_heads, physical + 1, head_dim]
        group = query.shape[1] // keys.shape[1]
        logits = torch.matmul(query, keys.repeat_interleave(group, dim=1).transpose(2, 3)) * module.scaling
        current = torch.softmax(logits.float(), dim=-1)[0, :, 0, :]  # [q_heads, physical + 1]
        physical = job["physical"]
        rows = [(row[module.layer_idx],) for row in job["rows"]] + [(current,)]
        (mass,) = _window_mass(rows, physical + 1, window, kv_heads)
        kept = _select(_max_pool(mass[:, :physical], pool), physical, job["budget"], sinks, window)
        index = kept[None, :, :, None].expand(1, -1, -1, layer.keys.shape[-1])
        layer.keys = torch.gather(layer.keys, 2, index)
        layer.values = torch.gather(layer.values, 2, index)
        mask = kwargs.get("attention_mask")
        if mask is not None:  # built for the uncut cache: the kept keys and the new one
            kwargs = {**kwargs, "attention_mask": mask[..., : job["budget"] + 1]}
        return args, kwargs

    return hook


def _entropy_budget(rows: list[tuple[torch.Tensor, ...]], length: int, window: int, kv_heads: int,
                    multiplier: float, sinks: int) -> int:
    """ceil(multiplier x the mean exp(entropy) over layers and KV heads of the last `window`
    rows' attention mass, normalised) + sinks + window, at least sinks + window."""
    counts = []
    for mass in _window_mass(rows, length, window, kv_heads):
        p = mass / mass.sum(dim=1, keepdim=True)
        entropy = -(p * torch.log(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim=1)
        counts += torch.exp(entropy).tolist()
    return max(math.ceil(multiplier * sum(counts) / len(counts)) + sinks + window, sinks + window)


def compacted_greedy(model_dir: Path, prompts: Sequence[Sequence[int]], max_tokens: int,
                     budgets: Sequence[int | None], sinks: int, buffer: int,
                     preempted_at: Sequence[Sequence[int]] | None = None,
                     policies: Sequence[str] | None = None, window: int = 8, pool: int = 7,
                     entropy: Sequence[float | None] | None = None) -> list[list[int]]:
    """Greedy tokens of each prompt; `budgets[i]` None: never compacted. `preempted_at[i]`: the
    numbers of generated tokens at which request i was preempted: its cache is dropped there and
    rebuilt by one prefill of prompt + every generated token (as vLLM recomputes a preempted
    request), and its budget is fixed again from that length. `policies[i]` (default streaming):
    the selection (module docstring). `entropy[i]`, a multiplier: request i's budget is
    `_entropy_budget` of the window after its prompt (or recomputation), known one token later:
    it is compacted before its second token is computed (`budgets[i]` is then ignored)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    kv_heads = model.config.num_key_value_heads
    in_layer: dict[str, dict | None] = {"job": None}
    for block in model.model.layers:
        block.self_attn.register_forward_pre_hook(_snapkv_in_layer(in_layer, kv_heads, sinks, window, pool),
                                                  with_kwargs=True)
    results = []
    preemptions = preempted_at or [()] * len(prompts)
    with torch.no_grad():
        for prompt, tokens_kept, preempted, policy, multiplier in zip(
                prompts, budgets, preemptions, policies or ["streaming"] * len(prompts),
                entropy or [None] * len(prompts)):
            scored = policy != "streaming" or multiplier is not None

            def grouped(probs: torch.Tensor) -> torch.Tensor:  # [q_heads, T] -> [kv_heads, T], float64
                return probs.double().reshape(kv_heads, -1, probs.shape[-1]).sum(dim=1)

            def prefill(ids: list[int]) -> tuple[object, int, list[tuple[torch.Tensor, ...]]]:
                nonlocal heavy
                out = model(input_ids=torch.tensor([ids]), use_cache=True, output_attentions=scored)
                rows = []
                if policy == "snapkv" or multiplier is not None:  # each position's attention row, per layer
                    rows = [tuple(a[0, :, i, : i + 1] for a in out.attentions) for i in range(len(ids))]
                if policy == "h2o":  # every query's attention, summed, per layer
                    heavy = [grouped(a[0].sum(dim=1)) for a in out.attentions]
                return out.past_key_values, int(out.logits[0, -1].argmax()), rows

            heavy: list[torch.Tensor] = []

            cache, first, rows = prefill(list(prompt))
            generated = [first]
            logical = physical = len(prompt)

            def budget_for(length: int) -> int | None:
                if multiplier is not None:
                    return None  # measured at the next step
                return None if tokens_kept is None else max(tokens_kept, sinks + 1)

            budget = budget_for(len(prompt))
            measure = multiplier is not None
            compacted_once = False
            while len(generated) < max_tokens:
                if len(generated) in preempted:
                    cache, token, rows = prefill([*prompt, *generated])
                    logical = physical = len(prompt) + len(generated)
                    budget, compacted_once, measure = budget_for(physical), False, multiplier is not None
                    generated.append(token)
                    continue
                due = False
                if measure:  # this step measures the window; the budget applies from the next
                    budget = _entropy_budget(rows, physical, window, kv_heads, multiplier, sinks)
                    measure = False
                elif budget is not None:
                    due = budget < physical if not compacted_once else physical >= budget + buffer
                    compacted_once = True
                    if due and policy == "streaming":
                        _keep_rows(cache, [*range(sinks), *range(physical - (budget - sinks), physical)])
                    elif due:
                        if policy == "snapkv":  # inside each layer, during the next forward pass
                            in_layer["job"] = {"cache": cache, "rows": rows, "physical": physical,
                                               "budget": budget}
                        elif policy == "h2o":
                            masses = heavy
                        else:
                            masses = [-torch.linalg.vector_norm(layer.keys[0].double(), dim=-1) for layer in cache.layers]
                        if policy != "snapkv":
                            kept = [_select(m, physical, budget, sinks, window) for m in masses]
                            _keep_per_head(cache, kept)
                        heavy = [m.gather(1, k) for m, k in zip(heavy, kept)] if policy == "h2o" else heavy
                        rows = []
                # The mask covers the cache as the forward pass starts (an in-layer compaction
                # cuts it with the cache).
                mask_length = physical + 1 if in_layer["job"] is not None or not due else budget + 1
                if due:
                    physical = budget
                out = model(input_ids=torch.tensor([[generated[-1]]]), position_ids=torch.tensor([[logical]]),
                            attention_mask=torch.ones(1, mask_length, dtype=torch.long),
                            past_key_values=cache, use_cache=True, output_attentions=scored)
                in_layer["job"] = None
                if policy == "snapkv" or multiplier is not None:
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
