"""AdaptiveLogitsProcessor through both of vLLM's logits-processor interfaces, without an engine.

The V1 runner drives it with BatchUpdate (removed, added, moved) and `apply(logits)` after
temperature; Model Runner V2 with `add_request(slot, params)` and `apply(logits, ctx)` before
temperature. The engine tests run the V1 path in real vLLM; MRV2 cannot be built on CPU, so
its interface is exercised here.
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor

from reference import sampler_reference
from vllm_adaptive.faults import FAULT_INJECT_ENV, injected_faults
from vllm_adaptive.sampling import mirostat
from vllm_adaptive.sampling.params import SAMPLERS
from vllm_adaptive.sampling.processor import AdaptiveLogitsProcessor
from vllm_adaptive.worker_metrics import ENV_DIR, SAMPLER, read_snapshots

VOCAB = 64
CONFIG = SimpleNamespace(additional_config={"adaptive": {"sampling": {"mirostat_tau": 4.0}}})


def mirostat_params(tau: float | None = None, eta: float = 0.5, temperature: float = 1.0) -> SamplingParams:
    extra: dict = {"adaptive_sampler": "mirostat_v2", "mirostat_eta": eta}
    if tau is not None:
        extra["mirostat_tau"] = tau
    return SamplingParams(temperature=temperature, extra_args=extra)


def update(added=(), removed=(), moved=(), size: int = 0) -> BatchUpdate:
    return BatchUpdate(batch_size=size, removed=list(removed), added=list(added), moved=list(moved))


def v1_processor() -> AdaptiveLogitsProcessor:
    return AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)


def peaked_logits(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3.0


def test_one_class_implements_both_runner_interfaces() -> None:
    assert issubclass(AdaptiveLogitsProcessor, V1LogitsProcessor)
    assert issubclass(AdaptiveLogitsProcessor, V2LogitsProcessor)
    assert v1_processor().runner_interface == "v1"
    v2 = AdaptiveLogitsProcessor(CONFIG, SimpleNamespace())
    assert v2.runner_interface == "v2"
    with pytest.raises(TypeError, match="V1 runner"):
        AdaptiveLogitsProcessor(CONFIG, 1, 2, 3)


def test_is_argmax_invariant_so_v1_runs_it_after_temperature() -> None:
    assert v1_processor().is_argmax_invariant() is True


def test_rows_without_a_sampler_are_bitwise_untouched() -> None:
    proc = v1_processor()
    proc.update_state(update(added=[(0, SamplingParams(), None, []), (1, mirostat_params(1.0), None, []),
                                    (2, SamplingParams(extra_args={"x": 1}), None, [])], size=3))
    logits = peaked_logits(3)
    before = logits.clone()
    out = proc.apply(logits)
    assert torch.equal(out[0], before[0]) and torch.equal(out[2], before[2])
    assert torch.isinf(out[1]).sum() > 0
    assert torch.equal(out[1][~torch.isinf(out[1])], before[1][~torch.isinf(out[1])])


def test_mu_starts_at_two_tau_and_config_default_fills_tau() -> None:
    proc = v1_processor()
    proc.update_state(update(added=[(0, mirostat_params(), None, [])], size=1))
    state = proc._book.active[0]
    assert state.request.values["mirostat_tau"] == 4.0  # from the deployment config
    assert state.mu == 8.0


def test_mu_follows_the_sampled_token_surprise() -> None:
    proc = v1_processor()
    outputs: list[int] = []
    proc.update_state(update(added=[(0, mirostat_params(tau=2.0, eta=0.5), None, outputs)], size=1))
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125] + [1e-9] * (VOCAB - 4)]))
    proc.apply(logits.clone())  # mu = 4: keeps the four likely tokens (renormalised ~= same)
    outputs.append(1)  # the engine sampled token 1 (p' = 0.25 -> 2 bits)
    proc.update_state(None)
    proc.apply(logits.clone())
    surprise = -math.log2(0.25 / (1.0 + 1e-9 * 0))  # kept set's mass ~ 1
    assert proc._book.active[0].mu == pytest.approx(4.0 - 0.5 * (surprise - 2.0), abs=1e-3)


def test_state_follows_requests_through_swaps_and_moves() -> None:
    proc = v1_processor()
    a, b = mirostat_params(tau=1.0), mirostat_params(tau=9.0)
    proc.update_state(update(added=[(0, a, None, []), (1, b, None, [])], size=2))
    proc.update_state(update(moved=[(0, 1, MoveDirectionality.SWAP)], size=2))
    assert proc._book.active[0].request.values["mirostat_tau"] == 9.0
    assert proc._book.active[1].request.values["mirostat_tau"] == 1.0
    proc.update_state(update(removed=[0], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)], size=1))
    assert set(proc._book.active) == {0}
    assert proc._book.active[0].request.values["mirostat_tau"] == 1.0


def test_preempted_request_resumes_with_its_mu_and_pending_update() -> None:
    proc = v1_processor()
    params = mirostat_params(tau=2.0, eta=0.5)
    outputs: list[int] = []
    proc.update_state(update(added=[(0, params, None, outputs)], size=1))
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125] + [1e-9] * (VOCAB - 4)]))
    proc.apply(logits.clone())
    outputs.append(0)  # sampled a 1-bit token: mu 4 -> 4.5
    proc.update_state(None)
    proc.apply(logits.clone())
    assert proc._book.active[0].mu == pytest.approx(4.5, abs=1e-3)
    outputs.append(2)  # sampled a 3-bit token, then the request is preempted
    proc.update_state(update(removed=[0], size=0))
    assert not proc._book.active
    other = v1_processor()  # unrelated traffic in between must not matter
    other.apply(peaked_logits(2))
    proc.update_state(update(added=[(3, params, None, outputs)], size=4))  # back, at another row
    proc.apply(torch.cat([peaked_logits(3), logits]).clone())
    # mu carries on from 4.5 with the update owed for the 3-bit token (a reset would give 3.5)
    assert proc._book.active[3].mu == pytest.approx(4.5 - 0.5 * (3.0 - 2.0), abs=1e-3)


def test_request_displaced_by_a_one_way_move_is_parked_and_resumes() -> None:
    """vLLM's batch update for a preempted request at index 0 with a request at 2 condensed into
    its place says only `moved (2 -> 0)`: index 0 is not in `removed`. The state at 0 must be
    parked, not dropped, and come back with its mu when the request is added again."""
    proc = v1_processor()
    params = mirostat_params(tau=2.0, eta=0.5)
    outputs: list[int] = []
    proc.update_state(update(added=[(0, params, None, outputs), (1, SamplingParams(), None, []),
                                    (2, mirostat_params(tau=9.0), None, [])], size=3))
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125] + [1e-9] * (VOCAB - 4)]))
    proc.apply(logits.repeat(3, 1))
    outputs.append(0)  # sampled a 1-bit token: mu 4 -> 4.5
    proc.update_state(None)
    proc.apply(logits.repeat(3, 1))
    outputs.append(2)  # sampled a 3-bit token, then preempted; request 2 takes its index
    proc.update_state(update(moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)], size=2))
    assert proc._book.active[0].request.values["mirostat_tau"] == 9.0
    proc.update_state(update(added=[(2, params, None, outputs)], size=3))  # resumed
    proc.apply(logits.repeat(3, 1))
    assert proc._book.active[2].mu == pytest.approx(4.5 - 0.5 * (3.0 - 2.0), abs=1e-3)


def test_finished_request_state_is_freed() -> None:
    proc = v1_processor()
    params = mirostat_params(tau=2.0)
    proc.update_state(update(added=[(0, params, None, [])], size=1))
    proc.update_state(update(removed=[0], size=0))
    assert len(proc._book._parked) == 1
    del params
    gc.collect()
    assert len(proc._book._parked) == 0


def broken(*args: object) -> None:
    raise RuntimeError("boom")


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Switch fault points on (VLLM_ADAPTIVE_FAULT_INJECT, read once per process)."""

    def switch(names: str) -> None:
        monkeypatch.setenv(FAULT_INJECT_ENV, names)
        injected_faults.cache_clear()

    yield switch
    monkeypatch.delenv(FAULT_INJECT_ENV, raising=False)
    injected_faults.cache_clear()


def test_failure_degrades_requests_to_plain_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = v1_processor()
    proc.update_state(update(added=[(0, mirostat_params(tau=1.0), None, [])], size=1))
    monkeypatch.setattr(mirostat, "apply_keep_set_", broken)
    logits = peaked_logits(1)
    before = logits.clone()
    out = proc.apply(logits)
    assert torch.equal(out, before)
    assert proc.failures == 1
    assert proc.failure_counts()[("mirostat_v2", "apply")] == 1
    assert not proc._book.active  # the request continues without the sampler


def test_apply_fault_after_the_sampler_ran_leaves_every_row_as_it_came(inject) -> None:
    """sampler:apply fails after the sampler computed its rows and before they are written."""
    proc = v1_processor()
    plain, sampled = SamplingParams(temperature=0.7), mirostat_params(tau=1.0)
    proc.update_state(update(added=[(0, plain, None, []), (1, sampled, None, [])], size=2))
    inject("sampler:apply")
    logits = peaked_logits(2)
    before = logits.clone()
    assert torch.equal(proc.apply(logits), before)
    inject("")
    assert torch.equal(proc.apply(logits), before)  # failed for good: the next step is plain too
    assert proc.failure_counts()[("mirostat_v2", "apply")] == 1 and proc.failures == 1


def test_update_state_fault_serves_the_request_plainly_and_spares_the_others(inject) -> None:
    proc = v1_processor()
    first = mirostat_params(tau=1.0)
    proc.update_state(update(added=[(0, first, None, [])], size=1))
    inject("sampler:update_state")
    second, third = mirostat_params(tau=1.0), mirostat_params(tau=1.5)
    proc.update_state(update(added=[(1, second, None, []), (2, third, None, [])], size=3))
    inject("")
    assert set(proc._book.active) == {0}  # admitted before the fault: still sampled
    logits = peaked_logits(3)
    before = logits.clone()
    out = proc.apply(logits)
    assert torch.isinf(out[0]).any()
    assert torch.equal(out[1:], before[1:])
    assert proc.failure_counts()[("mirostat_v2", "update_state")] == 2


def test_update_state_never_raises_and_drops_states_it_can_no_longer_place() -> None:
    """A batch update the processor cannot follow (here a malformed move) leaves every request
    plain rather than applying a state to the wrong row."""
    proc = v1_processor()
    proc.update_state(update(added=[(0, mirostat_params(tau=1.0), None, []),
                                    (1, SamplingParams(temperature=0.7), None, [])], size=2))
    proc.update_state(update(moved=[(0,)], size=2))  # type: ignore[list-item]
    assert not proc._book.active
    logits = peaked_logits(2)
    before = logits.clone()
    assert torch.equal(proc.apply(logits), before)
    assert proc.failure_counts()[("mirostat_v2", "update_state")] == 1


def test_a_failed_request_stays_plain_after_preemption(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = v1_processor()
    params = mirostat_params(tau=1.0)
    proc.update_state(update(added=[(0, params, None, [])], size=1))
    with monkeypatch.context() as patch:
        patch.setattr(mirostat, "apply_keep_set_", broken)
        proc.apply(peaked_logits(1))
    proc.update_state(update(removed=[0], size=0))  # preempted
    proc.update_state(update(added=[(0, params, None, [])], size=1))  # resumed
    assert not proc._book.active
    logits = peaked_logits(1)
    before = logits.clone()
    assert torch.equal(proc.apply(logits), before)
    assert proc.failures == 1


def test_parking_failure_degrades_only_the_leaving_request(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = v1_processor()
    leaving, staying = mirostat_params(tau=1.0), mirostat_params(tau=1.5)
    proc.update_state(update(added=[(0, leaving, None, []), (1, staying, None, [])], size=2))
    proc.apply(peaked_logits(2))
    monkeypatch.setattr(proc, "_save_pending", broken)
    proc.update_state(update(removed=[0], moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)], size=1))
    monkeypatch.undo()
    assert proc._book.active[0].request.values["mirostat_tau"] == 1.5
    proc.update_state(update(added=[(1, leaving, None, [])], size=2))  # back: plain for good
    assert set(proc._book.active) == {0}
    assert proc.failure_counts()[("mirostat_v2", "update_state")] == 1


def test_failures_are_logged_once_per_sampler_and_stage(
    inject, caplog: pytest.LogCaptureFixture
) -> None:
    proc = v1_processor()
    inject("sampler:update_state")
    with caplog.at_level(logging.DEBUG, logger="vllm_adaptive.sampling.processor"):
        for row in range(3):
            proc.update_state(update(added=[(row, mirostat_params(tau=1.0), None, [])], size=row + 1))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "mirostat_v2 failed in update_state" in errors[0].getMessage()
    assert errors[0].exc_info is not None and "sampler:update_state" in str(errors[0].exc_info[1])
    assert proc.failures == 3


def test_failure_counts_start_at_zero_for_every_sampler_and_stage() -> None:
    v1 = v1_processor().metrics_snapshot()
    assert {(f["sampler"], f["stage"]) for f in v1["failures"]} == {
        (name, stage) for name in SAMPLERS for stage in ("update_state", "apply")
    }
    assert all(f["requests"] == 0 for f in v1["failures"])
    v2, _ = v2_setup()
    assert {f["stage"] for f in v2.metrics_snapshot()["failures"]} == {"add_request", "apply"}


def test_processor_publishes_its_failures_for_the_servers_metrics(
    inject, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    proc = v1_processor()
    inject("sampler:update_state")
    proc.update_state(update(added=[(0, mirostat_params(tau=1.0), None, [])], size=1))
    assert proc._publisher is not None
    proc._publisher.close()
    [snapshot] = read_snapshots(tmp_path, SAMPLER)
    failed = {(f["sampler"], f["stage"]): f["requests"] for f in snapshot["failures"]}
    assert failed[("mirostat_v2", "update_state")] == 1 and sum(failed.values()) == 1


def test_mean_surprise_converges_to_tau_in_a_sampling_loop() -> None:
    """Mirostat's point: the observed surprise of sampled tokens averages to tau."""
    proc = v1_processor()
    gen = torch.Generator().manual_seed(1)
    for tau in (2.0, 3.0, 5.0):
        outputs: list[int] = []
        params = mirostat_params(tau=tau, eta=0.1)
        proc.update_state(update(added=[(0, params, None, outputs)], size=1))
        surprises = []
        for step in range(400):
            logits = torch.randn(1, 1000, generator=gen) * 2.5  # a fresh "model" row each step
            out = proc.apply(logits.clone())
            probs = torch.softmax(out[0].double(), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=gen))
            if step >= 100:
                surprises.append(-math.log2(probs[token].item()))
            outputs.append(token)
            proc.update_state(None)
        proc.update_state(update(removed=[0], size=0))
        assert abs(sum(surprises) / len(surprises) - tau) < 0.5, tau


def test_admission_check_that_breaks_admits_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in the admission check (not a bad argument) must not refuse or fail the request:
    the worker parses again under its own guard and serves it plainly if that fails too."""
    with monkeypatch.context() as patch:
        patch.setattr("vllm_adaptive.sampling.processor.parse_sampler_request", broken)
        AdaptiveLogitsProcessor.validate_params(mirostat_params(tau=2.0))
    with monkeypatch.context() as patch:
        patch.setattr("vllm_adaptive.metrics.count_request", broken)
        AdaptiveLogitsProcessor.validate_params(mirostat_params(tau=2.0))  # counting failed: admitted


# ---- Model Runner V2 interface ----------------------------------------------------------


def v2_setup(max_reqs: int = 4, max_len: int = 16) -> tuple[AdaptiveLogitsProcessor, SimpleNamespace]:
    req_states = SimpleNamespace(
        total_len=SimpleNamespace(gpu=torch.zeros(max_reqs, dtype=torch.int32)),
        all_token_ids=SimpleNamespace(gpu=torch.zeros(max_reqs, max_len, dtype=torch.int32)),
    )
    return AdaptiveLogitsProcessor(CONFIG, req_states), req_states


def v2_ctx(slots: list[int]) -> SimpleNamespace:
    return SimpleNamespace(idx_mapping_np=np.array(slots), expanded_idx_mapping=torch.tensor(slots))


def test_v2_add_request_claims_only_sampled_mirostat_requests() -> None:
    proc, _ = v2_setup()
    assert proc.add_request(0, mirostat_params(tau=2.0)) is True
    assert proc.add_request(1, SamplingParams()) is False
    assert proc.add_request(2, mirostat_params(tau=2.0, temperature=0.0)) is False  # greedy
    assert proc.add_request(0, SamplingParams()) is False  # slot recycled: old state dropped
    assert not proc._book.active


def test_v2_applies_keep_set_at_the_request_temperature_to_unscaled_logits() -> None:
    proc, req_states = v2_setup()
    temperature = 2.0
    proc.add_request(2, mirostat_params(tau=1.5, temperature=temperature))
    req_states.total_len.gpu[2] = 5
    logits = peaked_logits(2)
    before = logits.clone()
    out = proc.apply(logits, v2_ctx([1, 2]))  # row 0 -> slot 1 (plain), row 1 -> slot 2
    assert torch.equal(out[0], before[0])
    expected = sampler_reference("mirostat_v2", before[1] / temperature, {"mirostat_tau": 1.5}, temperature)
    kept = ~torch.isinf(expected)
    assert 1 < int(kept.sum()) < VOCAB
    assert torch.equal(~torch.isinf(out[1]), kept)
    assert torch.equal(out[1][kept], before[1][kept])  # unscaled: MRV2 applies temperature later


def test_v2_mu_update_reads_committed_tokens() -> None:
    proc, req_states = v2_setup()
    proc.add_request(0, mirostat_params(tau=2.0, eta=0.5))
    req_states.total_len.gpu[0] = 3
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125] + [1e-9] * (VOCAB - 4)]))
    proc.apply(logits.clone(), v2_ctx([0]))
    req_states.all_token_ids.gpu[0, 3] = 2  # sampled token 2 (3 bits), committed
    req_states.total_len.gpu[0] = 4
    proc.apply(logits.clone(), v2_ctx([0]))
    assert proc._book.active[0].mu == pytest.approx(4.0 - 0.5 * (3.0 - 2.0), abs=1e-3)


def test_v2_resumed_request_starts_mirostat_afresh() -> None:
    """MRV2 frees a preempted request's slot and adds it again like a new request: its mu
    starts again at 2 tau (the processor's docstring says so)."""
    proc, req_states = v2_setup()
    params = mirostat_params(tau=2.0, eta=0.5)
    proc.add_request(0, params)
    req_states.total_len.gpu[0] = 3
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125] + [1e-9] * (VOCAB - 4)]))
    proc.apply(logits.clone(), v2_ctx([0]))
    req_states.all_token_ids.gpu[0, 3] = 2
    req_states.total_len.gpu[0] = 4
    proc.apply(logits.clone(), v2_ctx([0]))
    assert proc._book.active[0].mu != 4.0
    assert proc.add_request(3, params) is True  # resumed in another slot
    assert proc._book.active[3].mu == 4.0


def test_v2_add_request_failure_declines_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    proc, _ = v2_setup()
    assert proc.add_request(0, mirostat_params(tau=2.0)) is True
    monkeypatch.setattr("vllm_adaptive.sampling.processor._new_state", broken)
    assert proc.add_request(0, mirostat_params(tau=2.0)) is False  # slot 0 recycled, then failed
    assert proc.add_request(1, SamplingParams()) is False
    assert not proc._book.active
    assert proc.failure_counts()[("mirostat_v2", "add_request")] == 1 and proc.failures == 1


def test_v2_apply_fault_leaves_the_unscaled_rows(inject) -> None:
    proc, req_states = v2_setup()
    proc.add_request(2, mirostat_params(tau=1.5, temperature=2.0))
    req_states.total_len.gpu[2] = 5
    inject("sampler:apply")
    logits = peaked_logits(2)
    before = logits.clone()
    assert torch.equal(proc.apply(logits, v2_ctx([1, 2])), before)
    assert proc.failure_counts()[("mirostat_v2", "apply")] == 1


# ---- vLLM's own loaders accept the class ------------------------------------------------

FQCN = "vllm_adaptive.sampling.processor:AdaptiveLogitsProcessor"


def test_v1_loader_builds_the_processor_by_name() -> None:
    from vllm.v1.sample.logits_processor import build_logitsprocs

    vllm_config = SimpleNamespace(speculative_config=None, additional_config={},
                                  scheduler_config=SimpleNamespace(max_num_seqs=8))
    built = build_logitsprocs(vllm_config, torch.device("cpu"), False, False, [FQCN])
    ours = [p for p in built.all if isinstance(p, AdaptiveLogitsProcessor)]
    assert len(ours) == 1 and ours[0].runner_interface == "v1"
    assert ours[0] in built.argmax_invariant


def test_model_runner_v2_loader_builds_and_validates_the_processor() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        build_custom_logits_processors,
        build_custom_logits_processors_params_validator,
    )

    tensor = SimpleNamespace(gpu=torch.zeros(4, dtype=torch.int32))
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=4, vocab_size=VOCAB,
                                 all_token_ids=tensor, prompt_len=tensor, prefill_len=tensor, total_len=tensor)
    [processor] = build_custom_logits_processors(CONFIG, req_states, False, [FQCN])
    assert isinstance(processor, AdaptiveLogitsProcessor) and processor.runner_interface == "v2"
    validate = build_custom_logits_processors_params_validator([FQCN])
    validate(mirostat_params(tau=3.0))
    with pytest.raises(VLLMValidationError, match="mirostat_tau must be a number in"):
        validate(mirostat_params(tau=-1.0))
