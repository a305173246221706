"""Patch: vLLM's rejection sampler accepts, unverified, the small-model tokens EAD routes.

Why: Entropy Adaptive Decoding (vllm_adaptive.routing) lets the draft model write the text
while its entropy is low: those tokens must be accepted whatever the target would have written.
vLLM 0.32 has no per-request lossy acceptance ("synthetic" accepts by preset rates for every
request and fails on CPU; "block" is lossless) and no hook between the sampling constraints and
the acceptance kernels. The forced positions need the target's logits after the grammar bitmask,
the logits processors and the sampling constraints (so that every constraint still wins), which
exist only inside `RejectionSampler.forward`, passed to the module function `rejection_sample`.

How: rebind the global `rejection_sample` of `vllm.v1.sample.rejection_sampler` (which
`RejectionSampler.forward` calls by its global name) to a wrapper. Without an armed plan, and in
every engine without EAD, the wrapper calls vLLM's function with the same arguments (one global
lookup and one `None` check more). With a plan, `vllm_adaptive.routing.gate.RoutingGate` forces
the planned positions (a one-hot row on the draft token in a copy of the logits) and drops the
bonus where the plan says so (docs in that module). Applied when the module is imported (the V1
runner imports it in workers), through a one-shot import hook.

Removal plan: when vLLM offers per-request lossy acceptance (a typical-acceptance or
"accept these positions" option in the rejection sampler), or a hook after
`apply_sampling_constraints` in `RejectionSampler.forward`.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ._import_hook import OnImport

MODULE = "vllm.v1.sample.rejection_sampler"
SYMBOL = "rejection_sample"
_MARK = "__vllm_adaptive_original__"
# vLLM 0.32's parameters of rejection_sample, in order.
PARAMETERS = [
    "draft_token_ids", "num_draft_tokens", "max_spec_len", "cu_num_draft_tokens", "draft_probs",
    "target_logits", "bonus_token_ids", "sampling_metadata", "synthetic_mode",
    "synthetic_conditional_rates", "use_fp64_gumbel",
]


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    from vllm_adaptive.routing import gate as routing_gate

    @functools.wraps(original)
    def rejection_sample(*args: Any, **kwargs: Any) -> Any:
        gate = routing_gate.current()
        if gate is None:
            return original(*args, **kwargs)
        return gate.rejection_sample(original, *args, **kwargs)

    setattr(rejection_sample, _MARK, original)
    return rejection_sample


def rebind(module: ModuleType) -> None:
    """Wrap `module.rejection_sample` once, if the contract holds; never raises (it runs inside
    vLLM's import). A contract that does not hold is recorded, and a deployment that asks for
    routing stops at start-up."""
    from vllm_adaptive.patches import PATCHES, record_failure

    spec = next(s for s in PATCHES if s.module == __name__.rsplit(".", 1)[-1])
    try:
        current = getattr(module, SYMBOL)
        if hasattr(current, _MARK):
            return
        check_contract()
        setattr(module, SYMBOL, _wrap(current))
    except Exception as e:  # noqa: BLE001 - never into vLLM's import
        record_failure(spec, e)


_hook = OnImport(MODULE, rebind)


def apply() -> None:
    _hook.install()


def revert() -> None:
    _hook.uninstall()
    module = sys.modules.get(MODULE)
    current = getattr(module, SYMBOL, None) if module is not None else None
    original = getattr(current, _MARK, None)
    if original is not None:
        setattr(module, SYMBOL, original)


def check_contract() -> None:
    """What the wrapper and the gate assume about the installed vLLM (EAD.md §10, facts 1, 3, 4)."""
    import importlib

    from vllm.v1.worker.gpu_input_batch import InputBatch

    from vllm_adaptive.patches import PatchContractError

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise PatchContractError(message)

    module = importlib.import_module(MODULE)
    current = getattr(module, SYMBOL, None)
    require(current is not None, f"{MODULE} has no function {SYMBOL} any more")
    original = getattr(current, _MARK, current)
    params = list(inspect.signature(original).parameters)
    require(params == PARAMETERS, f"{SYMBOL} parameters changed: {params}")
    require(getattr(module, "PLACEHOLDER_TOKEN_ID", None) == -1,
            "PLACEHOLDER_TOKEN_ID is no longer -1")
    forward = inspect.getsource(module.RejectionSampler.forward)
    constraints = forward.find("apply_sampling_constraints(")
    call = forward.find(f"output_token_ids = {SYMBOL}(")
    require(0 <= constraints < call,
            f"RejectionSampler.forward no longer calls {SYMBOL} by its global name after "
            "apply_sampling_constraints")
    update = inspect.getsource(InputBatch.update_req_spec_token_ids)
    require("cur_spec_token_ids.extend(spec_token_ids)" in update,
            "InputBatch.update_req_spec_token_ids no longer keeps the scheduled drafts per row")
