"""write_rows_: its host-read form (CPU) and the form CUDA runs (no host read) write the same.
in_row_chunks: the samplers that go through it in chunks of rows off CUDA mask exactly what one
pass over every row masks."""

from __future__ import annotations

import pytest
import torch

from vllm_adaptive.sampling import batch_rows, epsilon_eta, mirostat, mirostat_v1, top_n_sigma
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


CHUNKED = {
    "epsilon": lambda logits, k, g, rows: epsilon_eta.apply_epsilon_eta_(
        logits, torch.rand(k, generator=g) * 0.05, torch.zeros(k), rows),
    "eta": lambda logits, k, g, rows: epsilon_eta.apply_epsilon_eta_(
        logits, torch.zeros(k), torch.rand(k, generator=g) * 0.05, rows),
    "top_n_sigma": lambda logits, k, g, rows: top_n_sigma.apply_top_n_sigma_(
        logits, torch.rand(k, generator=g) * 2.0, rows),
    # These return each row's kept normaliser, which must match too.
    "mirostat_v2": lambda logits, k, g, rows: mirostat.apply_keep_set_(
        logits, torch.rand(k, generator=g) * 6, rows),
    "mirostat_v1": lambda logits, k, g, rows: mirostat_v1.apply_keep_set_(
        logits, torch.rand(k, generator=g) * 6, torch.randint(2, 30, (k,), generator=g), rows),
}


@pytest.mark.parametrize("subset", [False, True], ids=["every-row", "some-rows"])
@pytest.mark.parametrize("sampler", sorted(CHUNKED))
def test_chunked_samplers_mask_what_one_pass_masks(
    monkeypatch: pytest.MonkeyPatch, sampler: str, subset: bool
) -> None:
    logits = torch.randn(9, 40, generator=torch.Generator().manual_seed(5)) * 4
    logits[2, :5] = float("-inf")
    rows = torch.tensor([0, 2, 3, 5, 8]) if subset else None
    k = 5 if subset else 9
    one_pass = logits.clone()
    expected = CHUNKED[sampler](one_pass, k, torch.Generator().manual_seed(6), rows)  # 360 logits: one chunk
    monkeypatch.setattr(batch_rows, "CPU_CHUNK_LOGITS", 80)  # 2 rows of 40 per chunk, a last one of 1
    chunked = logits.clone()
    returned = CHUNKED[sampler](chunked, k, torch.Generator().manual_seed(6), rows)
    assert torch.equal(chunked, one_pass)
    if sampler.startswith("mirostat"):
        assert torch.equal(returned, expected)
    assert (chunked == float("-inf")).sum() > (logits == float("-inf")).sum()  # it truncated
