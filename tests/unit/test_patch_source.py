"""patches/_source.py: a class's source found without `ast` (CPython 3.11's AST converter stays
broken for a whole process after one failed conversion, gh-106905)."""

from __future__ import annotations

import ast
import inspect

import pytest

from vllm_adaptive.patches._source import class_source


class Sample:
    """A class with what could end it early: a blank line, a comment at column 0, a nested class."""

    value = 1

# a comment at column 0 inside the class body
    def method(self) -> int:
        return self.value

    class Inner:
        pass


def after() -> None:
    pass


def test_class_source_is_the_class_block_up_to_the_next_top_level_statement() -> None:
    source = class_source(Sample)
    assert source.startswith("class Sample:\n")
    assert "def method(self)" in source and "class Inner:" in source
    assert "def after()" not in source
    assert source.rstrip("\n") == inspect.getsource(Sample).rstrip("\n")


def test_class_source_works_where_ast_parse_no_longer_does(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise SystemError("AST constructor recursion depth mismatch (before=141, after=57)")

    monkeypatch.setattr(ast, "parse", broken)
    with pytest.raises(SystemError):
        inspect.getsource(Sample)  # what the contract checks used before
    assert class_source(Sample).startswith("class Sample:")


def test_a_class_that_is_not_top_level_is_named() -> None:
    with pytest.raises(OSError, match="no top-level `class Inner`"):
        class_source(Sample.Inner)
