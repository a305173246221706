"""The proposer patch's contract check counts calls inside `with` blocks from tokens.

Expected counts are written by hand for each sample function below. The scan must not use
`ast.parse`: on CPython 3.11 one failed AST conversion anywhere in a process makes every later
`ast.parse` raise SystemError (gh-106905), which once failed the contract check in CI.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest

scan = importlib.import_module(
    "vllm_adaptive.patches.gpu_model_runner_draft_model_proposer"
)._calls_inside_with


def none_inside(self: Any) -> None:
    if self.a:
        self._sample_draft_tokens(1)
    for _ in range(3):
        x = self._sample_draft_tokens(2)  # a comment with ._sample_draft_tokens( in it
    with self.ctx():
        pass
    self._sample_draft_tokens(
        x,
    )
    "self._sample_draft_tokens(3)"


def nested_inside(self: Any) -> None:
    self._sample_draft_tokens(0)
    with self.ctx():
        if self.a:
            for _ in range(2):
                self._sample_draft_tokens(1)
        y = 1
    self._sample_draft_tokens(y)


def one_line_and_header(self: Any) -> None:
    with self.ctx(): self._sample_draft_tokens(1)  # noqa: E701
    with self._sample_draft_tokens(2):
        pass
    self._sample_draft_tokens(3)


async def async_with(self: Any) -> None:
    async with self.ctx():
        self._sample_draft_tokens(1)
    self._sample_draft_tokens(2)
    _sample_draft_tokens = self.other._sample_draft_tokens  # not a call
    _sample_draft_tokens(4)  # not an attribute call


class Holder:
    def method(self) -> None:
        with self.ctx():
            pass
        self._sample_draft_tokens(1)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        (none_inside, (3, 0)),
        (nested_inside, (3, 1)),
        (one_line_and_header, (3, 2)),
        (async_with, (2, 1)),
        (Holder.method, (1, 0)),
    ],
)
def test_counts_calls_and_those_inside_with(function: Any, expected: tuple[int, int]) -> None:
    assert scan(function, "_sample_draft_tokens") == expected


def test_other_callee_names_do_not_count() -> None:
    assert scan(nested_inside, "_sample_draft") == (0, 0)
