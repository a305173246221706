"""Every registered sampler through AdaptiveLogitsProcessor, in one mixed batch, on both runners.

The batched functions are held to their float64 references in test_sampler_matrix.py; here the
processor must route each request's row to the sampler it asked for, with its own parameters and
temperature, and leave every other row bitwise as it was.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate

from vllm_adaptive.sampling import dispatch, typical
from vllm_adaptive.sampling.params import SAMPLERS
from vllm_adaptive.sampling.processor import AdaptiveLogitsProcessor

VOCAB = 257
CONFIG = SimpleNamespace(additional_config={"adaptive": {}})
NEG_INF = float("-inf")

# Parameters that make each sampler change a row of peaked random logits.
REQUESTS: dict[str, dict[str, float]] = {
    "mirostat_v1": {"mirostat_tau": 2.0, "mirostat_m": 50},
    "mirostat_v2": {"mirostat_tau": 2.0},
    "dynatemp": {"dynatemp_range": 0.6, "dynatemp_exponent": 1.5},
    "edt": {"edt_base": 0.5, "edt_theta": 2.0},
    "typical": {"typical_p": 0.5},
    "epsilon": {"epsilon": 0.01},
    "eta": {"eta_cutoff": 0.02},
    "top_n_sigma": {"top_n_sigma": 1.0},
}
TEMPERATURE = {name: 0.6 + 0.1 * i for i, name in enumerate(REQUESTS)}


def test_every_registered_sampler_is_covered() -> None:
    assert set(REQUESTS) == set(SAMPLERS) == set(dispatch.ENTRIES)


def params_for(name: str) -> SamplingParams:
    return SamplingParams(
        temperature=TEMPERATURE[name], extra_args={"adaptive_sampler": name, **REQUESTS[name]}
    )


def batch_logits(rows: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3.0


def expected_row(name: str, tempered: torch.Tensor) -> torch.Tensor:
    """What the sampler makes of one tempered row [1, V], computed without the processor."""
    entry = dispatch.ENTRIES[name]
    row = tempered.clone()
    values = {k: torch.tensor([float(v)]) for k, v in REQUESTS[name].items()}
    full = {**{p.key: torch.tensor([float(p.parse(getattr(_defaults(), p.default_from)))])
               for p in SAMPLERS[name]}, **values}
    if entry.stateful:
        full["mu"] = torch.tensor([2.0 * full["mirostat_tau"].item()])
    entry.apply(row, full, torch.tensor([TEMPERATURE[name]]))
    return row


def _defaults():  # noqa: ANN202
    from vllm_adaptive.config import SamplingConfig

    return SamplingConfig()


def mixed_batch() -> tuple[list[SamplingParams | None], list[str | None]]:
    """Rows: plain, one per sampler, greedy with a sampler, plain with other extra_args."""
    names: list[str | None] = [None, *REQUESTS, "greedy", None]
    params: list[SamplingParams | None] = [SamplingParams(temperature=0.8)]
    params += [params_for(n) for n in REQUESTS]
    params.append(SamplingParams(temperature=0.0, extra_args={"adaptive_sampler": "typical"}))
    params.append(SamplingParams(temperature=0.9, extra_args={"other_processor": 1}))
    return params, names


def test_v1_mixed_batch_gives_each_row_its_sampler() -> None:
    proc = AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)
    params, names = mixed_batch()
    added = [(i, p, None, []) for i, p in enumerate(params)]
    proc.update_state(BatchUpdate(batch_size=len(params), removed=[], added=added, moved=[]))
    assert set(proc._book.active) == set(range(1, 1 + len(REQUESTS)))  # greedy row not claimed
    raw = batch_logits(len(params))
    # V1 divides sampled rows by their temperature (greedy rows by 1) before processors run.
    temperatures = [p.temperature if p.temperature >= 1e-5 else 1.0 for p in params]
    tempered = raw / torch.tensor(temperatures).unsqueeze(-1)
    before = tempered.clone()
    out = proc.apply(tempered)
    for i, name in enumerate(names):
        if name is None or name == "greedy":
            assert torch.equal(out[i], before[i]), i
            continue
        expected = expected_row(name, before[i : i + 1])[0]
        assert not torch.equal(expected, before[i]), f"{name} left its test row unchanged"
        assert torch.equal(out[i], expected), name
        assert not torch.isnan(out[i]).any()
        assert out[i].argmax() == before[i].argmax(), name  # argmax-invariant, as declared


def test_v2_mixed_batch_applies_samplers_at_the_request_temperature() -> None:
    """MRV2 passes unscaled logits; the row handed back, divided by T, is the V1 result."""
    tensor = SimpleNamespace(gpu=torch.zeros(16, dtype=torch.int32))
    req_states = SimpleNamespace(total_len=tensor, all_token_ids=SimpleNamespace(gpu=torch.zeros(16, 8)))
    proc = AdaptiveLogitsProcessor(CONFIG, req_states)
    params, names = mixed_batch()
    slots = list(range(10, 10 - len(params), -1))  # persistent slots, not batch order
    claimed = [proc.add_request(slot, p) for slot, p in zip(slots, params)]
    assert claimed == [n not in (None, "greedy") for n in names]
    raw = batch_logits(len(params))
    before = raw.clone()
    ctx = SimpleNamespace(idx_mapping_np=np.array(slots), expanded_idx_mapping=torch.tensor(slots))
    out = proc.apply(raw, ctx)
    for i, name in enumerate(names):
        if name is None or name == "greedy":
            assert torch.equal(out[i], before[i]), i
            continue
        t = TEMPERATURE[name]
        expected = expected_row(name, before[i : i + 1] / t)[0]
        kept = expected > NEG_INF
        assert torch.equal(out[i] > NEG_INF, kept), name
        if dispatch.ENTRIES[name].rescales:
            torch.testing.assert_close(out[i] / t, expected, rtol=1e-5, atol=1e-5)
        else:  # masked entries only; the rest bitwise the unscaled input
            assert torch.equal(out[i][kept], before[i][kept]), name


def test_a_failing_sampler_degrades_only_its_own_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)
    added = [(0, params_for("typical"), None, []), (1, params_for("top_n_sigma"), None, [])]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))

    def broken(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(typical, "apply_typical_", broken)
    logits = batch_logits(2)
    before = logits.clone()
    out = proc.apply(logits)
    assert torch.equal(out[0], before[0])  # typical failed: the row is as it came
    assert torch.isinf(out[1]).any()  # top-n-sigma still applied
    assert proc.failures == 1
    assert set(proc._book.active) == {1}
    proc.apply(batch_logits(2))  # the next step runs without the failed request
    assert proc.failures == 1
