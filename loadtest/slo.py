"""Service-level objectives for goodput, parsed from the command line.

Same names and unit as `vllm bench serve --goodput` (milliseconds; ttft, tpot, e2el), written as
one comma-separated argument, e.g. `--slo ttft:500,tpot:50` (spaces also separate pairs).
"""

from __future__ import annotations

import math

from .measures import SLO_NAMES

FORM = "NAME:MILLISECONDS pairs separated by commas, e.g. ttft:500,tpot:50 (names: " + ", ".join(
    SLO_NAMES
) + ")"


class SLOError(ValueError):
    """A malformed SLO argument; the message names the bad part and the accepted form."""


def parse_slos(text: str) -> dict[str, float]:
    slos: dict[str, float] = {}
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise SLOError(f"empty SLO {text!r}: expected {FORM}")
    for part in parts:
        name, sep, value = part.partition(":")
        name = name.strip().lower()
        if not sep:
            raise SLOError(f"bad SLO {part!r}: missing ':'; expected {FORM}")
        if name not in SLO_NAMES:
            raise SLOError(f"bad SLO {part!r}: unknown name {name!r}; expected {FORM}")
        try:
            limit = float(value)
        except ValueError:
            raise SLOError(
                f"bad SLO {part!r}: {value!r} is not a number of milliseconds; expected {FORM}"
            ) from None
        if not math.isfinite(limit) or limit < 0:
            raise SLOError(f"bad SLO {part!r}: the limit must be a finite number >= 0 ms")
        if name in slos:
            raise SLOError(f"bad SLO {part!r}: {name} given twice")
        slos[name] = limit
    return slos


def describe(slos_ms: dict[str, float]) -> str:
    return ", ".join(f"{name} <= {limit:g} ms" for name, limit in slos_ms.items())
