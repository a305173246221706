"""Patch: the V1 model runner's step output carries KV compaction's reports to the scheduler.

Why: the `entropy` budget rule (issue #18, vllm_adaptive.kvcache.budget) sets a request's budget
from how concentrated its observation window's attention is; the workers hold the queries and
the keys, the scheduler frees the blocks. vLLM returns nothing from the workers to the
scheduler but the step's `ModelRunnerOutput`, which `Scheduler.update_from_output` receives.

How: wrap `GPUModelRunner.sample_tokens` (a class attribute, set once; the CPU runner inherits
it): after vLLM's method, `vllm_adaptive.kvcache.worker.attach_reports` sets the attribute
REPORT_ATTRIBUTE (vllm_adaptive.kvcache.plan) of the returned ModelRunnerOutput (a non-slots
dataclass, pickled whole to a scheduler in another process) to the reports the worker made this
step (request id -> the mean effective number of attended tokens over its layers and KV
heads, or None where it could not be measured), never on vLLM's shared empty output; the
CompactingScheduler reads it in `update_from_output`. Without reports the wrapper reads one
attribute. Under tensor parallelism the executor returns the first rank's output: the budget
comes from that rank's KV heads. Applied when vllm.v1.worker.gpu_model_runner is imported.

Removal plan: when vLLM's ModelRunnerOutput carries per-request data from plugins (the R-KV PR,
vLLM #16160, proposed `num_dropped_tokens` there), or the scheduler can read worker state.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from ._class_method import ClassMethodPatch, original_of

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
METHOD = "sample_tokens"


def _wrap(original: Callable[..., Any]) -> Callable[..., Any]:
    from vllm_adaptive.kvcache.worker import attach_reports

    @functools.wraps(original)
    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        output = original(self, *args, **kwargs)
        attach_reports(self, output)
        return output

    return sample_tokens


def check_contract() -> None:
    """What `attach_reports` and the scheduler assume about the runner and its output."""
    import dataclasses
    import importlib

    from vllm_adaptive.patches import PatchContractError

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise PatchContractError(message)

    module = importlib.import_module(RUNNER_MODULE)
    current = vars(module.GPUModelRunner).get(METHOD)
    require(current is not None, f"GPUModelRunner has no {METHOD} any more")
    params = list(inspect.signature(original_of(current)).parameters)
    require(params[:2] == ["self", "grammar_output"], f"GPUModelRunner.{METHOD} parameters changed: {params}")
    outputs = importlib.import_module("vllm.v1.outputs")
    output_class = outputs.ModelRunnerOutput
    require(dataclasses.is_dataclass(output_class) and not hasattr(output_class, "__slots__"),
            "ModelRunnerOutput is no longer a dataclass without slots (an extra attribute would not stick)")
    require(isinstance(getattr(outputs, "EMPTY_MODEL_RUNNER_OUTPUT", None), output_class),
            "vllm.v1.outputs.EMPTY_MODEL_RUNNER_OUTPUT is gone (reports must never be set on a shared output)")
    core = importlib.import_module("vllm.v1.engine.core")
    step = inspect.getsource(core.EngineCore.step)
    require("self.model_executor.sample_tokens(" in step and "self.scheduler.update_from_output(" in step,
            "EngineCore.step no longer hands sample_tokens' output to the scheduler's update_from_output")


_patch = ClassMethodPatch(RUNNER_MODULE, "GPUModelRunner", METHOD, _wrap, lambda: check_contract(), __name__)
rebind, apply, revert = _patch.rebind, _patch.apply, _patch.revert
