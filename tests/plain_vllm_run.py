"""Greedy token ids from plain vLLM: run with VLLM_PLUGINS="" so no plugin loads at all.

Usage: VLLM_PLUGINS= python tests/plain_vllm_run.py MODEL OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from reference import ENGINE_ARGS, GREEDY_MAX_TOKENS, GREEDY_PROMPTS  # noqa: E402


def main() -> None:
    model, out = sys.argv[1], Path(sys.argv[2])
    from vllm import LLM, SamplingParams

    llm = LLM(model, **ENGINE_ARGS)
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(GREEDY_PROMPTS, params)
    out.write_text(json.dumps([list(o.outputs[0].token_ids) for o in outputs]))


if __name__ == "__main__":
    main()
