"""The JSON body of one streaming generation request, from the run's settings and a scenario."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from .scenarios import Scenario
from .sse import Api


@dataclass(frozen=True)
class RequestSettings:
    api: Api
    model: str
    max_tokens: int
    fixed_output: bool  # ignore_eos + min_tokens = max_tokens: every request writes max_tokens
    token_ids: bool  # ask vLLM to stream token ids, so chunks whose text is held back still count


def build_body(settings: RequestSettings, scenario: Scenario, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": settings.model}
    if settings.api is Api.COMPLETIONS:
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    body.update(
        max_tokens=settings.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    if settings.fixed_output:
        body.update(ignore_eos=True, min_tokens=settings.max_tokens)
    if settings.token_ids:
        body["return_token_ids"] = True
    body.update(copy.deepcopy(dict(scenario.body)))
    return body
