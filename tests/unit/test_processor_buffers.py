"""AdaptiveLogitsProcessor's per-step work: what it builds once per batch layout, what a
Mirostat request keeps between steps, and how a step reads the token sampled last.

Expected rows and mu values come from the samplers' float64 references (tests/reference.py,
`mirostat.keep_set_reference`), never from the processor's own buffers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality

from reference import sampler_reference
from vllm_adaptive.sampling import mirostat
from vllm_adaptive.sampling.processor import AdaptiveLogitsProcessor

CONFIG = SimpleNamespace(additional_config={"adaptive": {}})
NEG_INF = float("-inf")

REQUESTS = {
    "typical": {"typical_p": 0.5},
    "top_n_sigma": {"top_n_sigma": 0.7},
    "epsilon": {"epsilon": 0.02},
}


def params(name: str, temperature: float = 1.0, **values: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, extra_args={"adaptive_sampler": name, **values})


def v2_ctx(slots: list[int]) -> SimpleNamespace:
    return SimpleNamespace(idx_mapping_np=np.array(slots), expanded_idx_mapping=torch.tensor(slots))


def added(*entries: tuple[int, SamplingParams, list[int]], size: int) -> BatchUpdate:
    rows = [(i, p, None, o) for i, p, o in entries]
    return BatchUpdate(batch_size=size, removed=[], added=rows, moved=[])


def logits_rows(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0


def assert_rows_follow_requests(out: torch.Tensor, before: torch.Tensor, names: list[str]) -> None:
    for i, name in enumerate(names):
        want = sampler_reference(name, before[i], REQUESTS[name], 1.0)
        assert torch.equal(out[i] > NEG_INF, want > NEG_INF), (i, name)


def test_v1_groups_are_built_once_per_batch_layout_and_follow_a_reorder() -> None:
    proc = AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)
    names = list(REQUESTS)
    added = [(i, params(n, **REQUESTS[n]), None, []) for i, n in enumerate(names)]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=added, moved=[]))
    x = logits_rows(3, 500, 0)
    proc.apply(x.clone())
    def tensors() -> list[torch.Tensor]:
        return [t for g in proc._groups for t in (g.rows, g.cells, g.t0, *g.values.values())]

    built = tensors()
    proc.update_state(None)  # no batch change: the next step reuses every tensor
    out = proc.apply(x.clone())
    assert len(tensors()) == len(built) and all(a is b for a, b in zip(tensors(), built))
    assert_rows_follow_requests(out, x, names)
    # The requests at 0 and 2 swap rows: each row must get its own request's parameters.
    swap = BatchUpdate(batch_size=3, removed=[], added=[], moved=[(0, 2, MoveDirectionality.SWAP)])
    proc.update_state(swap)
    out = proc.apply(x.clone())
    assert_rows_follow_requests(out, x, [names[2], names[1], names[0]])


def test_v2_groups_follow_the_slot_mapping_of_each_step() -> None:
    req_states = SimpleNamespace(
        total_len=SimpleNamespace(gpu=torch.zeros(8, dtype=torch.int32)),
        all_token_ids=SimpleNamespace(gpu=torch.zeros(8, 16, dtype=torch.int32)),
    )
    proc = AdaptiveLogitsProcessor(CONFIG, req_states)
    assert proc.add_request(5, params("typical", **REQUESTS["typical"]))
    assert proc.add_request(2, params("epsilon", **REQUESTS["epsilon"]))
    x = logits_rows(2, 400, 1)

    def step(slots: list[int]) -> torch.Tensor:
        return proc.apply(x.clone(), v2_ctx(slots))

    assert_rows_follow_requests(step([5, 2]), x, ["typical", "epsilon"])
    groups = proc._groups
    assert_rows_follow_requests(step([5, 2]), x, ["typical", "epsilon"])
    assert proc._groups is groups  # the same mapping: nothing rebuilt
    assert_rows_follow_requests(step([2, 5]), x, ["epsilon", "typical"])
    assert proc._groups is not groups


def retained_bytes(proc: AdaptiveLogitsProcessor) -> int:
    """Bytes of every tensor the processor holds, except the logits it refers to (vLLM's)."""
    seen: set[int] = set()
    total = 0

    def visit(obj: object, depth: int) -> None:
        nonlocal total
        if id(obj) in seen or depth > 4 or obj is proc._held:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("vllm_adaptive.sampling"):
            for value in vars(obj).values():
                visit(value, depth + 1)

    visit(proc, 0)
    return total


def mirostat_steps(vocab: int, steps: int = 3) -> tuple[AdaptiveLogitsProcessor, int, torch.Tensor]:
    proc = AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)
    outputs: list[list[int]] = [[] for _ in range(4)]
    added = [(i, params("mirostat_v2", mirostat_tau=3.0), None, outputs[i]) for i in range(4)]
    proc.update_state(BatchUpdate(batch_size=4, removed=[], added=added, moved=[]))
    peak_net = 0
    logits = torch.empty(0)
    for step in range(steps):
        logits = logits_rows(4, vocab, step)
        with torch.profiler.profile(profile_memory=True) as prof:
            proc.apply(logits)
        # Net bytes allocated by apply and still alive when it returns.
        peak_net = max(peak_net, sum(e.self_cpu_memory_usage for e in prof.key_averages()))
        for i in range(4):
            outputs[i].append(int(logits[i].argmax()))
        proc.update_state(None)
    return proc, peak_net, logits


def test_mirostat_keeps_nothing_vocabulary_sized_between_steps() -> None:
    """What a Mirostat step leaves behind: a reference to vLLM's logits (no copy) and a few
    numbers per request; the same at 1k and 32k tokens."""
    small, small_net, small_logits = mirostat_steps(1000)
    large, large_net, large_logits = mirostat_steps(32_000)
    assert small._held is small_logits and large._held is large_logits
    assert retained_bytes(small) == retained_bytes(large)
    assert large_net < 4 * 32_000  # far below one float32 row of the vocabulary
    assert small_net == large_net


def test_v2_mu_update_reads_the_tokens_logit_after_vllms_in_place_temperature() -> None:
    """MRV2 divides the processed logits by the temperature in place after the processors; the
    next step measures the sampled token's surprise on those (tempered) values."""
    req_states = SimpleNamespace(
        total_len=SimpleNamespace(gpu=torch.zeros(4, dtype=torch.int32)),
        all_token_ids=SimpleNamespace(gpu=torch.zeros(4, 16, dtype=torch.int32)),
    )
    proc = AdaptiveLogitsProcessor(CONFIG, req_states)
    tau, eta, temperature = 2.0, 0.5, 2.0
    proc.add_request(1, params("mirostat_v2", temperature, mirostat_tau=tau, mirostat_eta=eta))
    req_states.total_len.gpu[1] = 3
    raw = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05] + [1e-4] * 59]))
    ctx = SimpleNamespace(idx_mapping_np=np.array([1]), expanded_idx_mapping=torch.tensor([1]))
    out = proc.apply(raw.clone(), ctx)
    out.div_(temperature)  # what vLLM's sampler does next, in place
    token = 2
    req_states.all_token_ids.gpu[1, 3] = token
    req_states.total_len.gpu[1] = 4
    proc.apply(raw.clone(), ctx)
    tempered = (raw[0] / temperature).double()
    keep = mirostat.keep_set_reference(tempered, 2 * tau)
    p = torch.softmax(tempered.masked_fill(~keep, NEG_INF), dim=-1)[token].item()
    assert proc._book.active[1].mu == pytest.approx(2 * tau - eta * (-math.log2(p) - tau), abs=1e-5)


def test_v2_update_owed_by_a_request_that_missed_a_step_is_dropped() -> None:
    """The logits a pending update refers to are replaced every step; a request that was not
    scheduled in the previous step cannot read its token's logit any more: mu stays."""
    req_states = SimpleNamespace(
        total_len=SimpleNamespace(gpu=torch.tensor([3, 3], dtype=torch.int32)),
        all_token_ids=SimpleNamespace(gpu=torch.zeros(2, 16, dtype=torch.int32)),
    )
    proc = AdaptiveLogitsProcessor(CONFIG, req_states)
    proc.add_request(0, params("mirostat_v2", mirostat_tau=2.0, mirostat_eta=0.5))
    proc.add_request(1, params("mirostat_v2", mirostat_tau=2.0, mirostat_eta=0.5))
    x = logits_rows(2, 64, 3)

    def step(slots: list[int]) -> None:
        proc.apply(x[: len(slots)].clone(), v2_ctx(slots))
        for row, slot in enumerate(slots):  # each scheduled request's token is committed
            n = int(req_states.total_len.gpu[slot])
            req_states.all_token_ids.gpu[slot, n] = int(x[row].argmax())
            req_states.total_len.gpu[slot] = n + 1

    step([0, 1])
    step([1])  # request 0 sits this step out; its step-1 token is already committed
    step([0, 1])
    assert proc._book.active[0].mu == 4.0
    assert proc._book.active[1].mu != 4.0


def test_v1_request_parked_before_its_token_arrived_keeps_its_one_row_for_the_update() -> None:
    """If a request leaves the batch before the token it sampled is in its output list, the
    processor copies that one row out (the held logits go at the next step) and applies the
    update when the request is back with its token."""
    proc = AdaptiveLogitsProcessor(CONFIG, torch.device("cpu"), False)
    tau, eta = 2.0, 0.5
    request = params("mirostat_v2", mirostat_tau=tau, mirostat_eta=eta)
    outputs: list[int] = []
    proc.update_state(added((0, request, outputs), size=1))
    row = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.05, 0.05] + [1e-4] * 59]))
    proc.apply(row.clone())
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))  # no token yet
    [parked] = proc._book.parked()
    assert parked.saved_row is not None and parked.saved_row[0].shape == (64,)
    proc.apply(logits_rows(2, 64, 9))  # other traffic: the held logits are replaced
    token = 1
    outputs.append(token)
    proc.update_state(added((1, request, outputs), size=2))
    proc.apply(logits_rows(2, 64, 10))
    keep = mirostat.keep_set_reference(row[0].double(), 2 * tau)
    p = torch.softmax(row[0].double().masked_fill(~keep, NEG_INF), dim=-1)[token].item()
    assert proc._book.active[1].mu == pytest.approx(2 * tau - eta * (-math.log2(p) - tau), abs=1e-5)
