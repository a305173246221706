"""The type of a per-request sampler parameter: a number in an interval, and its error."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class SamplerParamError(ValueError):
    """A bad per-request argument. `parameter` and `value` are what the client sent."""

    def __init__(self, message: str, parameter: str, value: Any) -> None:
        super().__init__(message)
        self.parameter = parameter
        self.value = value


@dataclasses.dataclass(frozen=True)
class NumberParam:
    """A float parameter with an interval; `default_from` names the SamplingConfig field."""

    key: str
    low: float
    high: float
    default_from: str
    low_open: bool = False
    high_open: bool = False

    def interval(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def parse(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise self._error(value)
        try:
            number = float(value)
        except ValueError:
            raise self._error(value) from None
        in_range = math.isfinite(number)
        in_range = in_range and (number > self.low if self.low_open else number >= self.low)
        in_range = in_range and (number < self.high if self.high_open else number <= self.high)
        if not in_range:
            raise self._error(value)
        return number

    def _error(self, value: Any) -> SamplerParamError:
        return SamplerParamError(
            f"{self.key} must be a number in {self.interval()}, got {value!r}", self.key, value
        )
