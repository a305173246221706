"""A plain decoder for KV compaction's exactness tests: transformers' Llama, greedy, one token at
a time, whose cache is cut to the kept tokens at the moments the compaction rule says.

Written from the rule, not from vllm_adaptive.kvcache: the budget of a request with `kv_budget`
B tokens (fixed) is max(B, sinks + 1); it is compacted once its prompt (P tokens) is cached, if
the budget is below P, and again whenever the cache holds budget + buffer tokens before a new
token is computed; the streaming selection keeps the first
`sinks` tokens of the cache and its last budget - sinks, in every layer and KV head. New tokens
keep their true positions (RoPE), whatever the cache holds.
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


def compacted_greedy(model_dir: Path, prompts: Sequence[Sequence[int]], max_tokens: int,
                     budgets: Sequence[int | None], sinks: int, buffer: int,
                     preempted_at: Sequence[Sequence[int]] | None = None) -> list[list[int]]:
    """Greedy tokens of each prompt; `budgets[i]` None: never compacted. `preempted_at[i]`: the
    numbers of generated tokens at which request i was preempted: its cache is dropped there and
    rebuilt by one prefill of prompt + every generated token (as vLLM recomputes a preempted
    request), and its budget is fixed again from that length."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    results = []
    preemptions = preempted_at or [()] * len(prompts)
    with torch.no_grad():
        for prompt, tokens_kept, preempted in zip(prompts, budgets, preemptions):
            out = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
            cache = out.past_key_values
            generated = [int(out.logits[0, -1].argmax())]
            logical = physical = len(prompt)

            def budget_for(length: int) -> int | None:
                return None if tokens_kept is None else max(tokens_kept, sinks + 1)

            budget = budget_for(len(prompt))
            compacted_once = False
            while len(generated) < max_tokens:
                if len(generated) in preempted:
                    out = model(input_ids=torch.tensor([[*prompt, *generated]]), use_cache=True)
                    cache = out.past_key_values
                    logical = physical = len(prompt) + len(generated)
                    budget, compacted_once = budget_for(physical), False
                    generated.append(int(out.logits[0, -1].argmax()))
                    continue
                if budget is not None:
                    due = budget < physical if not compacted_once else physical >= budget + buffer
                    compacted_once = True
                    if due:
                        _keep_rows(cache, [*range(sinks), *range(physical - (budget - sinks), physical)])
                        physical = budget
                out = model(input_ids=torch.tensor([[generated[-1]]]), position_ids=torch.tensor([[logical]]),
                            attention_mask=torch.ones(1, physical + 1, dtype=torch.long),
                            past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logical += 1
                physical += 1
                generated.append(int(out.logits[0, -1].argmax()))
            results.append(generated)
    return results
