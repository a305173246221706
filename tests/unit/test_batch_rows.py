"""write_rows_: its host-read form (CPU) and the form CUDA runs (no host read) write the same."""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive.sampling.batch_rows import write_rows_, write_rows_without_host_read_


@pytest.mark.parametrize("rows", [None, torch.tensor([4, 0, 2])])
def test_both_forms_change_exactly_the_changed_rows(rows: torch.Tensor | None) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 33, generator=g)
    k = 5 if rows is None else 3
    values = torch.randn(k, 33, generator=g)
    changed = torch.tensor([True, False, True, False, True][:k])
    host, device = logits.clone(), logits.clone()
    write_rows_(host, rows, values, changed)
    write_rows_without_host_read_(device, rows, values, changed)
    assert torch.equal(host.view(torch.int32), device.view(torch.int32))  # bitwise
    target = torch.arange(5) if rows is None else rows
    for i in range(k):
        want = values[i] if changed[i] else logits[target[i]]
        assert torch.equal(device[target[i]], want)
    untouched = sorted(set(range(5)) - set(target.tolist()))
    assert torch.equal(device[untouched], logits[untouched])
