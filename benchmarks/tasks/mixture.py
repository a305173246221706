"""Training mixtures and held-out evaluation sets over the tasks (arith, recall, text).

This is the interface the model trainer and the evaluation harness use:

    training_texts(seed, n, weights=None) -> list[str]
        n training documents, each `prompt + completion` with no BOS/EOS (the trainer adds
        them; end every document with EOS so models stop after the answer line). Documents
        are drawn task by task with probabilities `weights` (per document, not per token;
        default DEFAULT_WEIGHTS). Keyword options: `recall_tokens` (prompt length of recall
        documents: an int, or an inclusive (low, high) range drawn per document, for a
        length curriculum; default recall.DEFAULT_PROMPT_TOKENS) and `arith_spec`.
    training_examples(...)  the same documents as Example objects (to mask prompt tokens).
    eval_examples(task, seed, n) -> list[Example]
        n held-out examples of one task, at the task's default difficulty and length.
    Example(task, prompt, answer, completion)   frozen dataclass, from benchmarks.tasks.example.

Each task module (`benchmarks.tasks.arith`, `.recall`, `.text`) has `generate(rng) -> Example`,
`extract_answer(text) -> str | None` and `is_correct(example, generated_text) -> bool`.

Held-out guarantee: every example belongs to one split by a hash of its task and prompt
(`example.split_of`); training draws skip held-out examples and evaluation draws skip training
ones, so the two never share a prompt, for any pair of seeds. Seeds select examples inside a
split: streams are seeded with `(split, task, seed)`, so a given (task, seed) always yields the
same sequence and the first n examples do not depend on n. The project's models are trained
with TRAIN_SEED and evaluated with EVAL_SEED (different on top of the split).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from types import ModuleType

from benchmarks.tasks import arith, recall, text
from benchmarks.tasks.example import Example, Split, split_of

__all__ = [
    "DEFAULT_WEIGHTS", "EVAL_SEED", "Example", "TASKS", "TRAIN_SEED",
    "eval_examples", "iter_examples", "task_module", "training_examples", "training_texts",
]

TASKS: dict[str, ModuleType] = {"arith": arith, "recall": recall, "text": text}
DEFAULT_WEIGHTS = {"arith": 0.6, "recall": 0.1, "text": 0.3}
TRAIN_SEED = 0
EVAL_SEED = 1000


def task_module(task: str) -> ModuleType:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


def _stream_rng(split: Split, task: str, seed: int) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed: stable across runs and Python versions.
    return random.Random(f"vllm-adaptive/{split}/{task}/{seed}")


def iter_examples(
    task: str, split: Split, seed: int, generate: Callable[[random.Random], Example] | None = None
) -> Iterator[Example]:
    """Endless stream of `task` examples of one split; `generate` overrides the task's default
    (e.g. shorter recall prompts); the hash split applies to whatever it generates."""
    generate = generate or task_module(task).generate
    rng = _stream_rng(split, task, seed)
    while True:
        example = generate(rng)
        if split_of(task, example.prompt) == split:
            yield example


def eval_examples(task: str, seed: int = EVAL_SEED, n: int = 100) -> list[Example]:
    """The first n held-out examples of `task` for `seed`, at the task's default settings."""
    stream = iter_examples(task, "eval", seed)
    return [next(stream) for _ in range(n)]


def _recall_generator(recall_tokens: int | tuple[int, int] | None, filler: bool = True) -> Callable[[random.Random], Example]:
    if recall_tokens is None:
        return lambda rng: recall.generate(rng, filler=filler)
    low, high = (recall_tokens, recall_tokens) if isinstance(recall_tokens, int) else recall_tokens
    if low > high:
        raise ValueError(f"recall_tokens range must be (low, high) with low <= high, got {recall_tokens}")
    for end in (low, high):
        recall.generate(random.Random(0), prompt_tokens=end, filler=filler)  # raises for lengths no recall prompt can have

    def generate(rng: random.Random) -> Example:
        return recall.generate(rng, prompt_tokens=rng.randint(low, high), filler=filler)

    return generate


def training_examples(
    seed: int,
    n: int,
    weights: dict[str, float] | None = None,
    *,
    recall_tokens: int | tuple[int, int] | None = None,
    recall_filler: bool = True,
    arith_spec: arith.ArithSpec | None = None,
) -> list[Example]:
    """n training examples, tasks drawn per document with probabilities `weights`."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    for task, weight in weights.items():
        task_module(task)
        if weight < 0:
            raise ValueError(f"weight of {task!r} must be >= 0, got {weight}")
    tasks = [t for t, w in weights.items() if w > 0]
    if not tasks:
        raise ValueError(f"weights must give some task a positive weight, got {weights}")
    generators: dict[str, Callable[[random.Random], Example] | None] = {
        "recall": _recall_generator(recall_tokens, recall_filler),
        "arith": (lambda rng: arith.generate(rng, arith_spec)) if arith_spec else None,
    }
    streams = {t: iter_examples(t, "train", seed, generators.get(t)) for t in tasks}
    chooser = random.Random(f"vllm-adaptive/train/mixture/{seed}")
    picks = chooser.choices(tasks, weights=[weights[t] for t in tasks], k=n)
    return [next(streams[t]) for t in picks]


def training_texts(
    seed: int,
    n: int,
    weights: dict[str, float] | None = None,
    *,
    recall_tokens: int | tuple[int, int] | None = None,
    arith_spec: arith.ArithSpec | None = None,
) -> list[str]:
    """n training documents (full prompt + completion text, no BOS/EOS), mixture of arith/recall/text."""
    examples = training_examples(seed, n, weights, recall_tokens=recall_tokens, arith_spec=arith_spec)
    return [e.text for e in examples]
