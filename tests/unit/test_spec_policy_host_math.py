"""The policy's numpy decisions (host_math, the CPU path) against its torch decisions (the
device path), driven with the same inputs: the same drafts, counters, calibration and per-request
state at every step, for every stop rule, greedy and probabilistic drafting, with requests
joining and leaving the batch. The torch path is held to plain-Python references by
test_spec_policy.py and test_spec_stop_rules.py; this file holds the numpy path to it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from vllm_adaptive.speculative.config import AdaptiveDraftConfig
from vllm_adaptive.speculative.policy import DraftLengthPolicy

VOCAB = 64
ROWS = 5
K = 6
STEPS = 40

RULES = [
    dict(stop_rule="none"),
    dict(stop_rule="entropy", entropy_threshold=1.5),
    dict(stop_rule="adaedl", adaedl_lambda=0.6),
    dict(stop_rule="specdec", specdec_threshold=0.5, confidence="top_prob"),
    dict(stop_rule="specdec", specdec_threshold=0.3, confidence="token_prob"),
    dict(stop_rule="specdec", confidence="top_prob", controller=True, controller_min_samples=2),
]


def drive(policy: DraftLengthPolicy, probabilistic: bool, seed: int, rows: int = ROWS) -> list[dict]:
    """STEPS engine steps over a batch of `rows`; what the policy decided at each."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    req_ids = [f"r{i}" for i in range(rows)]
    next_id = rows
    drafts: list[list[int]] = [[] for _ in range(rows)]
    trace = []
    for step in range(STEPS):
        accepted = [int(rng.integers(0, len(d) + 1)) for d in drafts]
        policy.observe_verification(req_ids, drafts, accepted)
        decoding = rng.random(rows) > 0.1  # now and then a prompt chunk
        progress = policy.begin(req_ids, decoding, K)
        for _ in range(progress.k):
            logits = torch.randn(rows, VOCAB, generator=generator)
            peaks = torch.rand(rows, generator=generator) * 10.0
            logits[torch.arange(rows), torch.randint(0, VOCAB, (rows,), generator=generator)] += peaks
            if probabilistic:
                probs = torch.softmax(logits / 0.8, dim=-1)
                tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                probs, tokens = None, logits.argmax(dim=-1)
            progress.record(logits, tokens, probs)
            if progress.should_end():
                break
        drafts = policy.finish(progress, req_ids, decoding)
        policy.observe_step(rows, rows + sum(len(d) for d in drafts), 0.02, max(progress.steps, 1), 0.002)
        trace.append({"step": step, "k": progress.k, "steps": progress.steps,
                      "drafts": [list(d) for d in drafts]})
        for row in np.flatnonzero(rng.random(rows) < 0.15).tolist():  # finished; a new request
            req_ids[row] = f"r{next_id}"
            next_id += 1
            drafts[row] = []
    return trace


def state(policy: DraftLengthPolicy) -> dict:
    return {
        "counters": dataclasses.asdict(policy.counters),
        "observed": policy.calibrator.observed.tolist(),
        "accepted": policy.calibrator.accepted.tolist(),
        "rows": {name: policy.rows.values[name].tolist() for name in policy.rows.values},
        "req_ids": list(policy.rows.req_ids),
        "controller_k": None if policy.controller is None else policy.controller.k,
        "threshold": getattr(policy.rule, "threshold", None),
    }


@pytest.mark.parametrize("rows", [ROWS, 1], ids=["batch", "one-row"])
@pytest.mark.parametrize("probabilistic", [False, True], ids=["greedy", "probabilistic"])
@pytest.mark.parametrize("rule", RULES, ids=lambda r: "-".join(str(v) for v in r.values()))
def test_numpy_and_torch_decisions_agree_step_by_step(rule: dict, probabilistic: bool, rows: int) -> None:
    """Batch 1 takes the one-row path (Python floats) on the host."""
    config = AdaptiveDraftConfig(enabled=True, max_draft_tokens=K, **{"controller": False, **rule})
    host = DraftLengthPolicy(config, host_math=True)
    device = DraftLengthPolicy(config, host_math=False)
    host_trace = drive(host, probabilistic, seed=7, rows=rows)
    device_trace = drive(device, probabilistic, seed=7, rows=rows)
    assert host_trace == device_trace
    assert state(host) == state(device)
    lengths = [len(d) for entry in host_trace for d in entry["drafts"]]
    if rule["stop_rule"] != "none":
        assert 0 < min(lengths) < K or len(set(lengths)) > 1  # the rule stopped some drafts early


def test_host_math_needs_a_cpu_device() -> None:
    with pytest.raises(ValueError, match="host_math needs a CPU device"):
        DraftLengthPolicy(AdaptiveDraftConfig(enabled=True), device="meta", host_math=True)
