"""Outputs of plain vLLM: run with VLLM_PLUGINS="" so no plugin loads at all.

Usage: VLLM_PLUGINS= python tests/plain_vllm_run.py MODEL OUT.json [ENGINE_ARGS_JSON [WORKLOAD_JSON]]

Without ENGINE_ARGS_JSON: greedy token ids of reference.GREEDY_PROMPTS. With it (engine
arguments merged over reference.ENGINE_ARGS, e.g. a speculative config): the result of
reference.spec_workload, called with the keyword arguments in WORKLOAD_JSON (prompts, max_tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from reference import ENGINE_ARGS, GREEDY_MAX_TOKENS, GREEDY_PROMPTS, spec_workload  # noqa: E402


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    from vllm import LLM, SamplingParams

    if len(sys.argv) > 3:
        llm = LLM(model, **{**ENGINE_ARGS, **json.loads(sys.argv[3])})
        workload = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
        out.write_text(json.dumps(spec_workload(llm, **workload)))
        return
    llm = LLM(model, **ENGINE_ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(GREEDY_PROMPTS, params)
    out.write_text(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
