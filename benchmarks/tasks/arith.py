"""`arith`: multi-step addition/subtraction with a worked, digit-reversed scratchpad.

The question is a chain of 2-4 operations on 2-3 digit numbers, e.g. `Q: 352+47-129+801`. The
worked solution first rewrites every operand with its digits reversed (least significant digit
first) and zero-padded to 4 digits, then applies one operation per line to the running total,
and ends with the final answer, also padded to 4 digits:

    Q: 352+47-129+801
    2530+7400-9210+1080
    2530+7400=9930
    9930-9210=0720
    0720+1080=1701
    answer: 1071

Why this shape (it has to be learnable by ~1-30M parameter models trained for minutes on CPU):
with the project tokenizer every digit is one token and `+ - = \\n` are single tokens, so every
scratchpad line has the same length (14 tokens) and every operand sits at a fixed distance from
where it is used. Reversed digits turn addition into a left-to-right computation: each result
digit depends only on the two digits above it and the carry from the digit just written (Lee et
al. 2023, "Teaching Arithmetic to Small Transformers", reversed output). Running totals never go
negative (a subtraction that would is drawn as an addition), so no signs are needed, and the
largest total (999 * 5) still fits in 4 digits. The chain length is what separates a small model
from a large one: an answer is right only if all of its ~8-16 computed digits are.
"""

from __future__ import annotations

import dataclasses
import random
import re

from benchmarks.tasks.example import Example

TASK = "arith"
WIDTH = 4  # digits of every scratchpad number; 5 operands of at most 999 sum to < 10**WIDTH


@dataclasses.dataclass(frozen=True)
class ArithSpec:
    """Difficulty: number of operations and digits per operand (both inclusive ranges)."""

    min_ops: int = 2
    max_ops: int = 4
    min_digits: int = 2
    max_digits: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}")
        if (self.max_ops + 1) * (10**self.max_digits - 1) >= 10**WIDTH:
            raise ValueError(f"{self.max_ops + 1} operands of {self.max_digits} digits can exceed {WIDTH} digits")


DEFAULT_SPEC = ArithSpec()


def reversed_padded(value: int) -> str:
    """`47` -> `7400`: digits least significant first, zero-padded to WIDTH."""
    return str(value).zfill(WIDTH)[::-1]


def solve(operands: list[int], ops: list[str]) -> tuple[list[str], int]:
    """The scratchpad lines and the final value of `operands[0] ops[0] operands[1] ...`."""
    lines = [reversed_padded(operands[0]) + "".join(op + reversed_padded(b) for op, b in zip(ops, operands[1:]))]
    total = operands[0]
    for op, b in zip(ops, operands[1:]):
        new_total = total + b if op == "+" else total - b
        lines.append(f"{reversed_padded(total)}{op}{reversed_padded(b)}={reversed_padded(new_total)}")
        total = new_total
    return lines, total


def generate(rng: random.Random, spec: ArithSpec = DEFAULT_SPEC) -> Example:
    n_ops = rng.randint(spec.min_ops, spec.max_ops)

    def operand() -> int:
        digits = rng.randint(spec.min_digits, spec.max_digits)
        return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1)

    operands = [operand()]
    ops: list[str] = []
    total = operands[0]
    for _ in range(n_ops):
        b = operand()
        op = rng.choice("+-")
        if op == "-" and b > total:
            op = "+"
        total = total + b if op == "+" else total - b
        operands.append(b)
        ops.append(op)
    question = str(operands[0]) + "".join(f"{op}{b}" for op, b in zip(ops, operands[1:]))
    lines, value = solve(operands, ops)
    assert value == total
    completion = "\n".join(lines) + f"\nanswer: {str(value).zfill(WIDTH)}"
    return Example(task=TASK, prompt=f"Q: {question}\n", answer=str(value), completion=completion)


_ANSWER = re.compile(r"^answer: *(\d+) *$", re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The value on the first `answer: N` line, without leading zeros; None if there is none."""
    match = _ANSWER.search(text)
    return str(int(match.group(1))) if match else None


def is_correct(example: Example, generated: str) -> bool:
    """Exact match of the extracted answer."""
    return extract_answer(generated) == example.answer
