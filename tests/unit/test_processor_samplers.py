"""Every registered sampler through AdaptiveLogitsProcessor, in one mixed batch, on both runners.

The batched functions are held to their float64 references in test_sampler_matrix.py; here the
processor must route each request's row to the sampler it asked for, with its own parameters and
temperature, and leave every other row bitwise as it was. Expected rows come from
`reference.sampler_reference` (each sampler's float64 reference, arguments named there), never
from the dispatch table the processor uses.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate

from reference import sampler_reference
from vllm_adaptive.sampling import typical
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
    assert set(REQUESTS) == set(SAMPLERS)


def params_for(name: str) -> SamplingParams:
    return SamplingParams(
        temperature=TEMPERATURE[name], extra_args={"adaptive_sampler": name, **REQUESTS[name]}
    )


def batch_logits(rows: int, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3.0


RESCALING = {"dynatemp", "edt"}  # rewrite finite logits; the others only mask tokens


def expected_row(name: str, tempered: torch.Tensor) -> torch.Tensor:
    """What the sampler must make of one tempered row [V] (float64 reference, mu = 2 tau)."""
    return sampler_reference(name, tempered, REQUESTS[name], TEMPERATURE[name])


def assert_row_matches(name: str, got: torch.Tensor, want: torch.Tensor, unscaled: torch.Tensor,
                       scale: float) -> None:
    """`got` (the processor's row) is the reference `want`: the same tokens kept, and the kept
    logits either rescaled as the reference says (dynatemp, edt; `got / scale`) or bitwise
    those of `unscaled`, the row the processor was given (masking samplers)."""
    kept = want > NEG_INF
    assert torch.equal(got > NEG_INF, kept), (name, int((got > NEG_INF).sum()), int(kept.sum()))
    if name in RESCALING:
        torch.testing.assert_close((got / scale).double(), want, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(got[kept], unscaled[kept]), name


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
        expected = expected_row(name, before[i])
        assert not torch.equal(expected, before[i].double()), f"{name} left its test row unchanged"
        assert_row_matches(name, out[i], expected, before[i], 1.0)
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
        # masked entries only, the rest bitwise the unscaled input; rescaled rows divided by t
        assert_row_matches(name, out[i], expected_row(name, before[i] / t), before[i], t)


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


def test_apply_fault_on_a_whole_batch_of_one_sampler_leaves_the_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row one stateless sampler: the processor works on the logits in place, so the fault
    point sits before the sampler writes; the failed rows stay exactly as vLLM made them."""
    from vllm_adaptive.faults import FAULT_INJECT_ENV, injected_faults

    proc = AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)
    added = [(i, params_for("typical"), None, []) for i in range(3)]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    monkeypatch.setenv(FAULT_INJECT_ENV, "sampler:apply")
    injected_faults.cache_clear()
    try:
        logits = batch_logits(3)
        before = logits.clone()
        out = proc.apply(logits)
    finally:
        monkeypatch.delenv(FAULT_INJECT_ENV)
        injected_faults.cache_clear()
    assert torch.equal(out, before)
    assert proc.failure_counts()[("typical", "apply")] == 3 and not proc._book.active
    assert torch.equal(proc.apply(logits), before)  # the next step too
