"""The trained pair the repository ships (models/adaptive-*): manifests, weights and the check
that a retrained pair reproduces their figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.models import shipped
from benchmarks.models import train as trainer
from benchmarks.models.pair import CONFIGS


@pytest.mark.parametrize("role", shipped.ROLES)
def test_shipped_weights_match_their_manifest(role: str) -> None:
    folder = shipped.verified(role)
    entry = shipped.manifest(role)
    tensors = load_file(folder / shipped.WEIGHTS)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    shape = CONFIGS[role].shape
    assert sum(t.numel() for t in tensors.values()) == entry.parameters == shape.parameter_count()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == shape.num_layers and config["dtype"] == "bfloat16"
    assert set(entry.accuracy) == {"arith", "recall", "text"} and entry.tolerance == shipped.TOLERANCE


def test_the_shipped_target_is_the_better_model_on_arith_and_recall() -> None:
    draft, target = shipped.manifest("draft"), shipped.manifest("target")
    assert target.accuracy["arith"] >= 0.6 and target.accuracy["arith"] >= 1.5 * draft.accuracy["arith"]
    assert target.accuracy["recall"] >= 0.9


def test_the_shipped_small_model_is_right_part_of_the_time() -> None:
    """EAD's small model: right on part of arith (the draft is not), below the target, far smaller."""
    draft, small, target = (shipped.manifest(role) for role in ("draft", "small", "target"))
    assert 0.3 <= small.accuracy["arith"] < target.accuracy["arith"]
    assert small.accuracy["arith"] >= draft.accuracy["arith"] + 0.3
    assert small.accuracy["recall"] >= 0.9
    assert small.parameters * 5 < target.parameters
    assert small.name == CONFIGS["small"].name == "adaptive-small"


def test_changed_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "adaptive-draft"
    copy.mkdir()
    for path in shipped.folder("draft").iterdir():
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(shipped, "ROOT", tmp_path)
    assert shipped.verified("draft") == copy
    data = bytearray((copy / shipped.WEIGHTS).read_bytes())
    data[-1] ^= 1
    (copy / shipped.WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(shipped.ShippedModelError, match="differs from the manifest"):
        shipped.verified("draft")


def test_differences_name_tasks_outside_the_tolerance() -> None:
    entry = shipped.manifest("target")
    within = {t: a + entry.tolerance * 0.5 for t, a in entry.accuracy.items()}
    assert shipped.differences("target", within) == []
    off = dict(within, arith=entry.accuracy["arith"] - entry.tolerance - 0.01)
    found = shipped.differences("target", off)
    assert len(found) == 1 and found[0].startswith("target arith:")
    assert shipped.differences("target", {}) == [f"target {t}: not measured" for t in sorted(entry.accuracy)]


def test_ship_writes_a_bfloat16_folder_that_verifies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import TINY

    monkeypatch.setenv("VLLM_ADAPTIVE_CACHE", str(tmp_path / "cache"))
    trained = trainer.ensure_trained(TINY, log=lambda _: None)
    monkeypatch.setattr(shipped, "ROOT", tmp_path / "models")
    out = shipped.ship("draft", trained, {"arith": 0.5}, {"n": 2})
    assert shipped.verified("draft") == out
    entry = shipped.manifest("draft")
    assert entry.accuracy == {"arith": 0.5} and entry.recipe_key == json.loads(
        (trained / "training.json").read_text())["key"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (trained / "tokenizer.json").read_bytes()
    original, converted = load_file(trained / shipped.WEIGHTS), load_file(out / shipped.WEIGHTS)
    for name, tensor in original.items():
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name
