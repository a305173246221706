"""The associative-recall probe's sequences (benchmarks/models/recall_probe.py)."""

from __future__ import annotations

import random

import pytest

from benchmarks.models import recall_probe as probe


@pytest.mark.parametrize(("pairs", "queries"), [(1, 1), (8, 8), (8, 1), (64, 20)])
def test_each_target_is_the_value_that_followed_the_same_key_earlier(pairs: int, queries: int) -> None:
    batch = probe.make_batch(random.Random(pairs), 5, pairs, queries)
    for inputs, targets in zip(batch.inputs, batch.targets):
        assert inputs[0] == probe.BOS and len(inputs) == 1 + 2 * (pairs + queries)
        context = dict(zip(inputs[1:2 * pairs + 1:2], inputs[2:2 * pairs + 1:2]))
        assert len(context) == pairs and set(context) <= set(probe.KEY_IDS)
        scored = [i for i, t in enumerate(targets) if t != probe.IGNORE]
        assert len(scored) == queries
        for i in scored:
            assert inputs[i] in context  # a repeated key ...
            assert targets[i] == context[inputs[i]] == inputs[i + 1]  # ... predicts its value


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="queries <= pairs"):
        probe.make_batch(random.Random(0), 1, 4, 5)
    with pytest.raises(ValueError, match="pairs <= 320"):
        probe.make_batch(random.Random(0), 1, 321, 1)
