"""Patch: the V1 model runner builds our adaptive draft-model proposer instead of vLLM's.

Why: vLLM's draft-model proposer drafts the same number of tokens for every request, and vLLM
has no registry or hook for proposer classes: `GPUModelRunner.__init__` (which the CPU runner
inherits) picks one in an if/elif and builds `DraftModelProposer`, looked up as a global of
`vllm.v1.worker.gpu_model_runner`. The only patch-free route, `method: "custom_class"`, runs
without vLLM's draft KV cache, attention metadata or device (docs/dev/spec_decode_research.md).

How: rebind that global to `vllm_adaptive.speculative.proposer.AdaptiveDraftModelProposer`, a
subclass that behaves as vLLM's (every override delegates at once) unless the engine runs the
plugin with `speculative.enabled: true`. The runner's `isinstance(..., DraftModelProposer)`
checks read the same global and accept the subclass. `gpu_model_runner` costs seconds and
hundreds of modules to import, and only workers need it, so `apply()` rebinds the global when
that module is imported (at once if it already is), through a one-shot import hook: the API
server and the engine core never import it on our account.

Removal plan: when vLLM offers a proposer registry or per-step draft hooks (then register the
subclass, or move its logic into the hooks), or when Model Runner V2 is the only runner (then
the adaptive logic moves to its speculator).
"""

from __future__ import annotations

import inspect
import io
import logging
import sys
import textwrap
import tokenize
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ._import_hook import OnImport
from ._source import class_source

logger = logging.getLogger(__name__)

RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"
SYMBOL = "DraftModelProposer"
_MARK = "__vllm_adaptive_original__"


def rebind(module: ModuleType) -> None:
    """Point `module.DraftModelProposer` at our subclass (once), if the contract holds. Never
    raises: it runs inside the import of vLLM's runner, in engines that may not use the plugin.
    A contract that does not hold leaves vLLM's proposer in place and is recorded
    (vllm_adaptive.patches.failures), so that a deployment asking for adaptive drafting stops."""
    from vllm_adaptive.patches import PATCHES, record_failure

    spec = next(s for s in PATCHES if s.module == __name__.rsplit(".", 1)[-1])
    try:
        current = getattr(module, SYMBOL)
        if _MARK in vars(current):
            return
        check_contract()
        from vllm_adaptive.speculative.proposer import AdaptiveDraftModelProposer

        if AdaptiveDraftModelProposer.__mro__[1] is not current:
            raise RuntimeError(f"{RUNNER_MODULE}.{SYMBOL} is {current!r}, not our base class")
        setattr(AdaptiveDraftModelProposer, _MARK, current)
        setattr(module, SYMBOL, AdaptiveDraftModelProposer)
    except Exception as e:  # noqa: BLE001 - never into vLLM's import
        record_failure(spec, e)


_hook = OnImport(RUNNER_MODULE, rebind)


def apply() -> None:
    _hook.install()


def revert() -> None:
    """Take the import hook out, or point the global back at vLLM's class."""
    _hook.uninstall()
    module = sys.modules.get(RUNNER_MODULE)
    current = getattr(module, SYMBOL, None) if module is not None else None
    if current is not None and _MARK in vars(current):
        setattr(module, SYMBOL, vars(current)[_MARK])
        delattr(current, _MARK)


def _calls_inside_with(function: Callable[..., Any], callee: str) -> tuple[int, int]:
    """(calls of `<obj>.<callee>(...)` in `function`, how many of them sit inside a `with`).

    Read from the tokens, not from `ast.parse`: CPython 3.11's AST converter never undoes its
    recursion counter when a conversion fails (gh-106905), so after one failed `ast.parse`
    anywhere in a process every later one raises "AST constructor recursion depth mismatch";
    a contract check must not depend on what the rest of the process did. A `with` statement's
    own line and its indented block count as inside it.
    """
    source = textwrap.dedent(inspect.getsource(function))
    tokens = [
        t for t in tokenize.generate_tokens(io.StringIO(source).readline)
        if t.type not in (tokenize.NL, tokenize.COMMENT)
    ]
    blocks: list[bool] = []  # per open indented block: inside a `with`
    line_is_with = False  # the current logical line is a `with` statement
    opens_with = False  # the line that just ended was one, so an INDENT opens its block
    line_start = True
    total = inside = 0
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT:
            blocks.append(opens_with or (blocks[-1] if blocks else False))
            opens_with = False
            continue
        opens_with = False
        if tok.type == tokenize.DEDENT:
            blocks.pop()
            continue
        if tok.type == tokenize.NEWLINE:
            opens_with, line_is_with, line_start = line_is_with, False, True
            continue
        if line_start:
            line_is_with = tok.string == "with"
            line_start = tok.string == "async"
        if (tok.type == tokenize.NAME and tok.string == callee and 0 < i < len(tokens) - 1
                and tokens[i - 1].string == "." and tokens[i + 1].string == "("):
            total += 1
            inside += line_is_with or (blocks[-1] if blocks else False)
    return total, inside


def _params(function: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(function).parameters)


def check_contract() -> None:
    """What the patch and AdaptiveDraftModelProposer assume about the installed vLLM."""
    import importlib

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer as Base
    from vllm.v1.worker.gpu_input_batch import InputBatch

    from vllm_adaptive.patches import PatchContractError
    from vllm_adaptive.speculative.proposer import AdaptiveDraftModelProposer

    def require(condition: bool, message: str) -> None:
        if not condition:
            raise PatchContractError(message)

    # The runner builds its draft-model proposer from the module global, with itself.
    runner_module = importlib.import_module(RUNNER_MODULE)
    bound = getattr(runner_module, SYMBOL, None)
    require(bound is not None, f"{RUNNER_MODULE} has no global {SYMBOL} any more")
    require(getattr(bound, _MARK, bound) is DraftModelProposer,
            f"{RUNNER_MODULE}.{SYMBOL} is neither vLLM's class nor our subclass of it")
    init = inspect.getsource(runner_module.GPUModelRunner.__init__)
    require(f"self.drafter = {SYMBOL}(" in init and "runner=self" in init,
            f"GPUModelRunner.__init__ no longer builds self.drafter = {SYMBOL}(..., runner=self)")

    # Our overrides have vLLM's signatures, and DraftModelProposer does not override them.
    init_params = _params(DraftModelProposer.__init__)
    require(init_params == ["self", "vllm_config", "device", "runner"],
            f"DraftModelProposer.__init__ parameters changed: {init_params}")
    for name in ("__init__", "propose", "_sample_draft_tokens"):
        ours = _params(getattr(AdaptiveDraftModelProposer, name))
        theirs = _params(getattr(DraftModelProposer if name == "__init__" else Base, name))
        require(ours == theirs, f"{name} parameters differ: ours {ours}, vLLM's {theirs}")
    require(_params(Base._sample_from_logits) == ["self", "logits", "sampling_metadata"],
            "SpecDecodeBaseProposer._sample_from_logits parameters changed")
    for name in ("propose", "_sample_draft_tokens", "_sample_from_logits"):
        require(name not in vars(DraftModelProposer),
                f"DraftModelProposer now overrides {name}; our subclass would bypass it")

    # The draft loop: K fixed at its start, every step sampled through _sample_draft_tokens,
    # always after the forward context has closed (so ending the loop from there is safe).
    propose = inspect.getsource(Base.propose)
    for needle in ("self.num_speculative_tokens = num_speculative_tokens",
                   "for token_index in range(self.num_speculative_tokens - 1)",
                   "self._last_draft_probs = None"):
        require(needle in propose, f"SpecDecodeBaseProposer.propose no longer contains {needle!r}")
    total, inside = _calls_inside_with(Base.propose, "_sample_draft_tokens")
    require(total >= 2 and not inside,
            f"SpecDecodeBaseProposer.propose calls _sample_draft_tokens {total} times, {inside} "
            "inside a with block; ending the draft loop from there would no longer be safe")
    sample = inspect.getsource(Base._sample_draft_tokens)
    require("self._greedy_sample(hidden_states)" in sample
            and "self._sample_from_logits(" in sample,
            "SpecDecodeBaseProposer._sample_draft_tokens samples differently now")
    require("return self.model.compute_logits(hidden_states).argmax(dim=-1)"
            in inspect.getsource(Base._greedy_sample),
            "SpecDecodeBaseProposer._greedy_sample is no longer the argmax of compute_logits")

    # What the proposer reads from the runner, and how list drafts reach the scheduler.
    runner_source = class_source(runner_module.GPUModelRunner)
    for needle, why in (
        ("isinstance(self._draft_token_ids, list)", "list drafts are no longer passed through"),
        ("self.num_decode_draft_tokens = ", "the scheduled draft counts per row moved"),
        ("self.discard_request_mask = ", "the partial-prefill mask moved"),
        ("num_rejected_tokens_gpu=num_rejected_tokens_gpu", "propose gets no rejections"),
        ("num_speculative_tokens=num_spec_tokens_to_schedule", "propose gets no scheduled K"),
    ):
        require(needle in runner_source, f"GPUModelRunner: {why} ({needle!r} not found)")
    require("self.spec_token_ids" in inspect.getsource(InputBatch.__init__),
            "InputBatch no longer keeps each row's scheduled spec_token_ids")
    require("request.spec_token_ids = " in inspect.getsource(Scheduler.update_draft_token_ids),
            "Scheduler.update_draft_token_ids no longer takes each request's list")
