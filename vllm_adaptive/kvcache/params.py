"""Per-request KV compaction arguments: the keys requests send, their ranges, their parsing.

A request opts in with `kv_budget` in `SamplingParams.extra_args` (over HTTP: `vllm_xargs`):
a number >= 1 keeps that many tokens (an integer), a number in (0, 1) keeps that share of the
prompt, "entropy" sets the budget from how concentrated the request's observation-window
attention is (`kv_entropy_multiplier` x the effective number of attended tokens, plus the sinks
and the window; vllm_adaptive.kvcache.budget). `kv_policy`, `kv_sinks`, `kv_buffer` and
`kv_entropy_multiplier` default to the deployment's `kvcache:` section
(vllm_adaptive.kvcache.config); sending them without `kv_budget` is refused. Numbers follow
`param_spec.as_number` ("40" is 40, `true` is not a number). A bad value raises
`SamplerParamError` naming the key, what is allowed and the value sent; admission turns it into
HTTP 400 (patch spec-decode-admission).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm_adaptive.kvcache.budget import BudgetRule
from vllm_adaptive.kvcache.config import (
    KV_POLICIES,
    MAX_BUFFER,
    MAX_ENTROPY_MULTIPLIER,
    MAX_SINKS,
    KVCompactionConfig,
)
from vllm_adaptive.sampling.param_spec import SamplerParamError, as_number, shown

BUDGET_KEY = "kv_budget"
KV_KEYS = ("kv_budget", "kv_policy", "kv_sinks", "kv_buffer", "kv_entropy_multiplier")
ENTROPY = "entropy"  # kv_budget's value for the entropy rule


def sent_kv_keys(extra_args: Mapping[str, Any] | None) -> list[str]:
    """The KV compaction keys a request sent, in KV_KEYS order."""
    if not extra_args:
        return []
    return [key for key in KV_KEYS if key in extra_args]


def parse_request(extra_args: Mapping[str, Any] | None, config: KVCompactionConfig) -> BudgetRule | None:
    """The request's budget rule, or None when it sent no KV key. Raises SamplerParamError."""
    extra_args = extra_args or {}
    sent = sent_kv_keys(extra_args)
    if not sent:
        return None
    if BUDGET_KEY not in extra_args:
        raise SamplerParamError(
            f"{sent[0]} is set but {BUDGET_KEY} is not: KV compaction needs {BUDGET_KEY} (tokens kept, "
            f"or the share of the prompt kept)", sent[0], extra_args[sent[0]])
    budget = extra_args[BUDGET_KEY]
    number = None if budget == ENTROPY else as_number(budget)
    if budget != ENTROPY and (number is None or number <= 0 or (number >= 1 and not number.is_integer())):
        raise SamplerParamError(
            f"{BUDGET_KEY} must be an integer >= 1 (tokens kept), a number in (0, 1) (share of the "
            f"prompt kept) or \"{ENTROPY}\", got {shown(budget)}", BUDGET_KEY, budget)
    multiplier = extra_args.get("kv_entropy_multiplier", config.entropy_multiplier)
    if "kv_entropy_multiplier" in extra_args and budget != ENTROPY:
        raise SamplerParamError(
            f"kv_entropy_multiplier is set but {BUDGET_KEY} is {shown(budget)}: it applies to "
            f"{BUDGET_KEY} \"{ENTROPY}\" only", "kv_entropy_multiplier", multiplier)
    policy = extra_args.get("kv_policy", config.policy)
    if policy not in KV_POLICIES:
        raise SamplerParamError(f"kv_policy must be one of {list(KV_POLICIES)}, got {shown(policy)}",
                                "kv_policy", policy)
    sinks = _parse_int("kv_sinks", extra_args.get("kv_sinks", config.sinks), 0, MAX_SINKS)
    buffer = _parse_int("kv_buffer", extra_args.get("kv_buffer", config.buffer), 1, MAX_BUFFER)
    common = dict(min_tokens=sinks + 1, sinks=sinks, recent=1, buffer=buffer)
    if budget == ENTROPY:
        scale = as_number(multiplier)
        if scale is None or not 0 < scale <= MAX_ENTROPY_MULTIPLIER:
            raise SamplerParamError(f"kv_entropy_multiplier must be a number in (0, {MAX_ENTROPY_MULTIPLIER:g}], "
                                    f"got {shown(multiplier)}", "kv_entropy_multiplier", multiplier)
        # The window is kept by every scored selection; streaming keeps its most recent tokens.
        return BudgetRule(rule="entropy", multiplier=float(scale), **{**common, "recent": config.window,
                                                                      "min_tokens": sinks + config.window})
    assert number is not None
    if number >= 1:
        return BudgetRule(rule="fixed", tokens=int(number), **common)
    return BudgetRule(rule="ratio", ratio=number, **common)


def request_policy(extra_args: Mapping[str, Any] | None, config: KVCompactionConfig) -> str:
    """The selection policy of a request that `parse_request` accepted (its kv_policy, or the
    deployment's)."""
    return str((extra_args or {}).get("kv_policy", config.policy))


def _parse_int(key: str, value: Any, low: int, high: int) -> int:
    number = as_number(value)
    if number is None or not number.is_integer() or not low <= number <= high:
        raise SamplerParamError(f"{key} must be an integer in [{low}, {high}], got {shown(value)}", key, value)
    return int(number)
