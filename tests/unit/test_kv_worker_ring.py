"""The SnapKV query ring's window (vllm_adaptive.kvcache.worker.window_queries): only queries
that were recorded, in position order, since the request's last compaction."""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive.kvcache.worker import QueryRing, WorkerKV, window_queries

LAYERS, WINDOW, HEADS, SIZE = 2, 4, 2, 3


def ring_with(positions: list[int]) -> QueryRing:
    queries = torch.zeros(LAYERS, WINDOW, HEADS, SIZE)
    ring = QueryRing(queries, torch.full((WINDOW,), -1, dtype=torch.int64))
    for p in positions:  # each recorded query holds its own position, in every layer
        ring.queries[:, p % WINDOW] = float(p)
        ring.positions[p % WINDOW] = p
    return ring


def test_the_last_recorded_queries_come_back_in_position_order() -> None:
    state = WorkerKV(rings={"r": ring_with(list(range(10)))})  # positions 6..9 held
    got = window_queries(state, "r", physical=10)
    assert got[0, :, 0, 0].tolist() == [6.0, 7.0, 8.0, 9.0]
    state.kept_at["r"] = 8  # compacted to 8 tokens, two appended since: only those two count
    assert window_queries(state, "r", physical=10)[1, :, 0, 0].tolist() == [8.0, 9.0]


@pytest.mark.parametrize(("positions", "kept_at", "physical"), [
    ([], 9, 10),  # nothing recorded: an empty ring must not pass for the query at position -1
    ([7, 9], 0, 10),  # position 8 was never recorded
    ([], 0, 10),
])
def test_a_ring_without_the_wanted_queries_is_refused(positions: list[int], kept_at: int, physical: int) -> None:
    state = WorkerKV(rings={"r": ring_with(positions)}, kept_at={"r": kept_at})
    with pytest.raises(RuntimeError, match="does not hold"):
        window_queries(state, "r", physical)
