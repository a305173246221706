"""What the adaptive sampler processor assumes about Model Runner V2's sampler (vLLM 0.32).

The processor's Mirostat keeps a reference to the logits tensor it was handed instead of a
[rows, vocab] copy, and reads the sampled token's logit from it at the next step
(vllm_adaptive/sampling/processor.py, module docstring). On MRV2 that is right only because
vLLM divides that same tensor by the request's temperature in place after the processors: the
tensor then holds the tempered values the sampler drew from. These checks fail when vLLM stops
doing so (a new tensor for temperature, processors after temperature, or an out-of-place
kernel), before an engine could show wrong Mirostat updates on a GPU.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from vllm.v1.worker.gpu.sample import gumbel, states
from vllm.v1.worker.gpu.sample.sampler import Sampler


def _statements(function: object) -> list[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    return [ast.unparse(node) for node in body]


def test_processors_run_then_temperature_divides_the_same_tensor() -> None:
    statements = _statements(Sampler.apply_sampling_params)
    loop = next(i for i, s in enumerate(statements)
                if s.startswith("for processor in self.logits_processors"))
    assert "logits = processor.apply(logits, ctx)" in statements[loop]
    temperature = next(i for i, s in enumerate(statements)
                       if "self.sampling_states.apply_temperature(logits" in s)
    assert temperature > loop
    # Nothing rebinds `logits` between the processors and the temperature.
    assert not any(s.startswith("logits =") for s in statements[loop + 1:temperature])
    assert not statements[temperature].startswith("logits =")  # called for its effect


def test_temperature_is_a_kernel_that_writes_its_input() -> None:
    source = inspect.getsource(states.SamplingStates.apply_temperature)
    assert "apply_temperature(logits, expanded_idx_mapping" in source
    assert inspect.signature(gumbel.apply_temperature).return_annotation in (None, "None")
    kernel = gumbel._temperature_kernel
    kernel = inspect.getsource(getattr(kernel, "fn", kernel))  # a Triton JITFunction, or plain
    assert "logits = logits / temperature" in kernel
    assert "tl.store(logits_ptr" in kernel
