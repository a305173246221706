"""Comparison helpers for kernel outputs against their float64 references."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def assert_rel_rms(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = ""
) -> None:
    """Infinities must match exactly; NaN never passes; finite entries within relative RMS `tol`.

    rel_rms = sqrt(mean((a - e)^2)) / max(sqrt(mean(e^2)), 1e-6), over the finite entries.
    """
    a = actual.double().cpu()
    e = expected.double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    nan_at = torch.isnan(a).nonzero().tolist()
    assert not nan_at, f"{what}: NaN in the output at {nan_at}"
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), (
        f"{what}: infinities differ: {a.tolist()} vs {e.tolist()}"
    )
    finite = ~inf_e
    if not finite.any():
        return
    diff = (a[finite] - e[finite]).pow(2).mean().sqrt().item()
    scale = max(e[finite].pow(2).mean().sqrt().item(), 1e-6)
    assert diff / scale <= tol, f"{what}: relative RMS error {diff / scale:.3g} > {tol:g}"


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same bits (NaN- and signed-zero-exact), via an integer view of the same width."""
    int_type = {4: torch.int32, 2: torch.int16}[actual.element_size()]
    same = actual.view(int_type) == expected.view(int_type)
    differ = (~same).nonzero()
    assert not len(differ), f"{what}: {len(differ)} elements differ, first at {differ[:5].tolist()}"


@contextmanager
def sparse_strided_logits(
    rows: int, vocab: int, row_stride: int, dtype: torch.dtype, lead: int
) -> Iterator[torch.Tensor]:
    """A [rows, vocab] view whose rows lie `row_stride` elements apart, `lead` elements into a
    file-backed, copy-on-write mapping of a sparse file: only touched pages take memory or disk.
    """
    size = lead + (rows - 1) * row_stride + vocab
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "logits.bin"
        with path.open("wb") as f:
            f.truncate(size * torch.tensor([], dtype=dtype).element_size())
        storage = torch.from_file(str(path), shared=False, size=size, dtype=dtype)
        yield storage.as_strided((rows, vocab), (row_stride, 1), lead)

