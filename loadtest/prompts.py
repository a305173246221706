"""Prompts for load tests: read from a file, or synthetic text of a chosen length.

A prompts file holds one prompt per line (blank lines skipped), or, for a `.jsonl` file, one
JSON object per line with a "prompt" string (multi-line prompts); requests cycle through them.
Synthetic prompts are deterministic sequences of common English words, a new one for every
request so that the server's prefix cache does not shorten prefills (as `vllm bench serve`'s
random dataset). A word is one to two tokens in most BPE vocabularies (about 1.7 for the
project's tiny model); the summary reports the server's own prompt token count.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at",
    "from", "this", "be", "are", "have", "it", "an", "not", "or", "which", "but", "had", "were",
    "one", "all", "their", "there", "been", "has", "when", "who", "will", "more", "no", "if",
    "out", "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only",
    "other", "new", "some", "time", "could", "these", "two", "may", "then", "do", "first", "any",
    "my", "now", "such", "like", "our", "over", "man", "me", "even", "most", "made", "after",
    "also", "did", "many", "before", "must", "through", "back", "years", "where", "much", "your",
    "way", "well", "down", "should", "because", "each", "just", "those", "people", "how", "too",
    "little", "state", "good", "very", "make", "world", "still", "own", "see", "men", "work",
    "long", "get", "here", "between", "both", "life",
)


class PromptsError(ValueError):
    pass


def load_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise PromptsError(f"cannot read prompts file {str(path)!r}: {err.strerror}") from None
    prompts: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                prompt = json.loads(line).get("prompt")
            except (json.JSONDecodeError, AttributeError):
                prompt = None
            if not isinstance(prompt, str):
                raise PromptsError(
                    f"{path}:{number}: expected a JSON object with a \"prompt\" string"
                )
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise PromptsError(f"prompts file {str(path)!r} holds no prompt")
    return prompts


def synthetic_prompts(prompt_words: int, seed: int = 0) -> Iterator[str]:
    """Endless prompts of `prompt_words` words each; the same sequence for the same seed."""
    if prompt_words < 1:
        raise PromptsError(f"prompt length must be at least 1 word, got {prompt_words}")
    rng = random.Random(seed)
    while True:
        yield " ".join(rng.choice(WORDS) for _ in range(prompt_words))


def prompt_stream(prompts_file: str, prompt_words: int, seed: int = 0) -> Iterator[str]:
    """The prompts of a run: the file's, cycled, or synthetic ones when no file is given."""
    if prompts_file:
        return itertools.cycle(load_prompts(Path(prompts_file)))
    return synthetic_prompts(prompt_words, seed)
