"""The type of a numeric parameter (a number in an interval), how a value sent for it is read,
and the error that names the parameter, the allowed interval and the value.

A leaf module (no torch, no vLLM, nothing else of the package): the sampler definitions, the
request parser, the deployment config and the speculative config all build on it.

What counts as a number: a JSON number (int or float) that is finite, or a string that spells
a plain decimal number ("0.25", "-3", "1e-4"; vLLM's `vllm_xargs` allows strings, and clients that
only send strings use them). Not numbers: booleans (`true` is not 1.0), None, lists, mappings,
NaN and infinities, integers too large for a float, and strings with spaces, underscores,
non-ASCII digits, hex or words ("nan", "inf", "1_000", " 3").
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

# A plain decimal number, ASCII only, nothing around it.
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class SamplerParamError(ValueError):
    """A bad per-request argument. `parameter` and `value` are what the client sent."""

    def __init__(self, message: str, parameter: str, value: Any) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


def shown(value: Any, limit: int = 120) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<{type(value).__name__} too large to show>"
    if len(text) <= limit:
        return text
    return f"{text[: limit - 20]}... ({len(text)} characters)"


def as_number(value: Any) -> float | None:
    """`value` as a finite float, or None when it is not a number (see the module docstring)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if _DECIMAL.fullmatch(value) is None:
            return None
    elif not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # OverflowError: an int beyond float's range
        return None
    return number if math.isfinite(number) else None


@dataclasses.dataclass(frozen=True)
class NumberParam:
    """A float parameter with an interval.

    `default_from` names the config field that holds its deployment default (the key itself
    when left empty). Sampler parameters also carry their built-in `default` and a one-line
    `meaning`.
    """

    key: str
    low: float
    high: float
    default_from: str = ""
    low_open: bool = False
    high_open: bool = False
    default: float | None = None
    meaning: str = ""

    def __post_init__(self) -> None:
        if not self.default_from:
            object.__setattr__(self, "default_from", self.key)

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def contains(self, number: float) -> bool:
        above = number > self.low if self.low_open else number >= self.low
        below = number < self.high if self.high_open else number <= self.high
        return above and below

    def parse(self, value: Any) -> float:
        number = as_number(value)
        if number is None or not self.contains(number):
            raise self._error(value)
        return number

    def _error(self, value: Any) -> SamplerParamError:
        return SamplerParamError(
            f"{self.key} must be a number in {self.interval()}, got {shown(value)}", self.key, value
        )
