"""`recall`: find one key's value among many `key=value` lines (a needle-in-a-haystack analog).

    kaz=4821
    mip=0937
    ... (about 210 lines: ~1500 prompt tokens by default)
    query: mip
    mip=0937
    answer: 0937

The prompt is the pair lines and the `query:` line; the completion first restates the queried
pair and then gives the answer. Restating makes the lookup the pattern small transformers learn
first (an induction head): the restated line is a copy of a context line, started by its key, and
the answer line copies the line right above it. With the project tokenizer every key is one
token (keys are three-letter pseudo-words the tokenizer learns whole), every digit is one
token, so a pair line is exactly TOKENS_PER_PAIR tokens and the prompt length is set exactly by
the number of pairs (`pairs_for_tokens`). Keys are distinct within a prompt; the queried pair is
drawn uniformly, so its depth in the context is uniform.
"""

from __future__ import annotations

import random
import re

from benchmarks.tasks.example import Example

TASK = "recall"
VALUE_DIGITS = 4

_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "bdgklmnprstxz"
# Key pool: a fixed, seeded sample of consonant-vowel-consonant pseudo-words.
KEYS: tuple[str, ...] = tuple(
    sorted(random.Random("recall-keys").sample([o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS], 320))
)

# With the project tokenizer: key, "=", VALUE_DIGITS digits, "\n".
TOKENS_PER_PAIR = 1 + 1 + VALUE_DIGITS + 1
# BOS + "query", ":", " ", key, "\n".
PROMPT_OVERHEAD_TOKENS = 1 + 5
DEFAULT_PROMPT_TOKENS = 1500


def pairs_for_tokens(prompt_tokens: int) -> int:
    """How many pairs make a prompt of about `prompt_tokens` tokens (BOS included)."""
    pairs = (prompt_tokens - PROMPT_OVERHEAD_TOKENS) // TOKENS_PER_PAIR
    if not 1 <= pairs <= len(KEYS):
        raise ValueError(
            f"a recall prompt of {prompt_tokens} tokens needs {pairs} pairs; allowed: 1 to {len(KEYS)} "
            f"pairs, i.e. {PROMPT_OVERHEAD_TOKENS + TOKENS_PER_PAIR} to "
            f"{PROMPT_OVERHEAD_TOKENS + TOKENS_PER_PAIR * len(KEYS)} tokens"
        )
    return pairs


DEFAULT_PAIRS = pairs_for_tokens(DEFAULT_PROMPT_TOKENS)


def generate(rng: random.Random, n_pairs: int = DEFAULT_PAIRS) -> Example:
    if not 1 <= n_pairs <= len(KEYS):
        raise ValueError(f"n_pairs must be in [1, {len(KEYS)}] (the key pool), got {n_pairs}")
    keys = rng.sample(KEYS, n_pairs)
    values = [f"{rng.randrange(10**VALUE_DIGITS):0{VALUE_DIGITS}d}" for _ in keys]
    i = rng.randrange(n_pairs)
    context = "".join(f"{k}={v}\n" for k, v in zip(keys, values))
    return Example(
        task=TASK,
        prompt=f"{context}query: {keys[i]}\n",
        answer=values[i],
        completion=f"{keys[i]}={values[i]}\nanswer: {values[i]}",
    )


_ANSWER = re.compile(r"^answer: *(\d+) *$", re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The digits on the first `answer: V` line (leading zeros kept); None if there is none."""
    match = _ANSWER.search(text)
    return match.group(1) if match else None


def is_correct(example: Example, generated: str) -> bool:
    """Exact match of the extracted answer."""
    return extract_answer(generated) == example.answer
