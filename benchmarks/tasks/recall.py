"""`recall`: find one key's value in a long context (a needle-in-a-haystack analog).

    puz=vop
    One day Mia went to the river.
    rod=dul
    She found a red kite under a tree.
    ... (about 1500 prompt tokens by default: ~95 pairs, each followed by a filler sentence)
    query: rod=
    dul

The prompt is the haystack (pair lines, each followed by one filler sentence from the story
grammar) and a `query:` line that ends with the queried key and its `=`; the completion is the
value and a newline. Keys and values are three-letter pseudo-words from one fixed pool of 320;
keys are distinct within a prompt, values are drawn independently (a value may repeat, or be
another pair's key).

The format makes the lookup a single match, the pattern small transformers learn first (an
induction head): the project tokenizer makes `key=` one token and every value one token, so
the answer is the token that follows the only other copy of the prompt's last token. A value
spelled over several tokens (digits, say) would need a different match offset per token, which
small models learn far later (docs/models_and_tasks.md, "Session 5"). Every token count is
exact: a pair line is 3 tokens (`key=`, value, newline) and a filler sentence of w words is
2w + 1 (words, spaces, the full stop, the newline), so `generate(rng, prompt_tokens=T)` gives a
prompt of at most T tokens (BOS included) and more than T - MAX_LINE_TOKENS. The queried pair is
drawn uniformly, so its depth in the context is uniform.
"""

from __future__ import annotations

import random
import re

from benchmarks.tasks import text
from benchmarks.tasks.example import Example

TASK = "recall"

_ONSETS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_CODAS = "bdgklmnprstxz"
# The word pool of keys and values: a fixed, seeded sample of consonant-vowel-consonant pseudo-words.
KEYS: tuple[str, ...] = tuple(
    sorted(random.Random("recall-keys").sample([o + v + c for o in _ONSETS for v in _VOWELS for c in _CODAS], 320))
)
VALUES = KEYS

PAIR_TOKENS = 3  # `key=`, value, newline
QUERY_TOKENS = 4  # "query", ":", " ", `key=`
PROMPT_OVERHEAD_TOKENS = 1 + QUERY_TOKENS  # BOS and the query line
MIN_PROMPT_TOKENS = PROMPT_OVERHEAD_TOKENS + PAIR_TOKENS  # one pair, no filler
DEFAULT_PROMPT_TOKENS = 1500


def _filler(rng: random.Random) -> str:
    """One sentence of the story grammar (names and words drawn afresh)."""
    hero, friend = rng.sample(sorted(text.HEROES), 2)
    slots = {slot: rng.choice(words) for slot, words in text.WORDS.items()}
    return rng.choice(text.MIDDLES).format(hero=hero, friend=friend, Pron=text.HEROES[hero].capitalize(), **slots)


def sentence_tokens(sentence: str) -> int:
    """Tokens of `sentence` plus its newline with the project tokenizer (every grammar word is one token)."""
    return 2 * len(sentence.split()) + 1


MAX_LINE_TOKENS = PAIR_TOKENS + max(sentence_tokens(t) for t in text.MIDDLES)


def generate(rng: random.Random, prompt_tokens: int = DEFAULT_PROMPT_TOKENS, filler: bool = True) -> Example:
    """A prompt of at most `prompt_tokens` tokens (BOS included): as many pair + filler lines as
    fit, then the query. `filler=False` packs pair lines only (dense lookups, for training)."""
    if not MIN_PROMPT_TOKENS <= prompt_tokens <= 16_384:
        raise ValueError(f"prompt_tokens must be in [{MIN_PROMPT_TOKENS}, 16384], got {prompt_tokens}")
    budget = prompt_tokens - PROMPT_OVERHEAD_TOKENS
    keys = iter(rng.sample(KEYS, min(len(KEYS), budget // PAIR_TOKENS)))
    lines: list[str] = []
    pairs: list[tuple[str, str]] = []
    while budget >= PAIR_TOKENS:
        key = next(keys, None)
        if key is None:
            raise ValueError(f"a prompt of {prompt_tokens} tokens needs more than the {len(KEYS)} keys of the pool")
        value = rng.choice(VALUES)
        lines.append(f"{key}={value}\n")
        pairs.append((key, value))
        budget -= PAIR_TOKENS
        if not filler:
            continue
        sentence = _filler(rng)
        if sentence_tokens(sentence) > budget:
            break
        lines.append(sentence + "\n")
        budget -= sentence_tokens(sentence)
    key, value = pairs[rng.randrange(len(pairs))]
    return ask("".join(lines), key, value)


def ask(haystack: str, key: str, value: str) -> Example:
    """The example that asks `haystack` for `key`, whose value there is `value` (the trainer
    asks one haystack several questions)."""
    return Example(TASK, f"{haystack}query: {key}=", value, f"{value}\n")


def haystack_of(example: Example) -> str:
    """The prompt without its query line."""
    return example.prompt.rpartition("query: ")[0]


_PAIR = re.compile(r"^([a-z]+)=([a-z]+)$", re.MULTILINE)


def pairs_of(haystack: str) -> list[tuple[str, str]]:
    """The (key, value) pairs of a haystack, in order."""
    return _PAIR.findall(haystack)


def extract_answer(text: str) -> str | None:
    """The first line of the generated text, stripped; None if it is empty."""
    first = text.split("\n", 1)[0].strip()
    return first or None


def is_correct(example: Example, generated: str) -> bool:
    """Exact match of the extracted answer."""
    return extract_answer(generated) == example.answer
