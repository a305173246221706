"""One task example, and the hash split that keeps held-out examples out of training.

Every example belongs to exactly one split, decided by a hash of its task and prompt (the
problem itself), not by the seed that produced it: the training stream skips every example the
hash puts in the held-out set and vice versa, so no evaluation prompt can appear in training
whatever seeds either side uses. Seeds then only choose *which* examples of a split are drawn.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

Split = Literal["train", "eval"]

# 1 example in EVAL_BUCKETS belongs to the held-out split. Changing this changes both splits.
EVAL_BUCKETS = 8


@dataclasses.dataclass(frozen=True)
class Example:
    """A task instance. `prompt + completion` is the training document (no BOS/EOS);
    `answer` is what the task's `extract_answer` must return from a correct completion
    (empty for tasks without an exact answer, such as text)."""

    task: str
    prompt: str
    answer: str
    completion: str

    @property
    def text(self) -> str:
        return self.prompt + self.completion


def split_of(task: str, prompt: str) -> Split:
    """The split a prompt belongs to: a fixed function of the task name and prompt text."""
    digest = hashlib.sha256(f"{task}\x00{prompt}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "little") % EVAL_BUCKETS == 0 else "train"
