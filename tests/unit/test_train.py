"""The model trainer on a tiny recipe (seconds): deterministic, cached, atomic, HF/vLLM-loadable."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks.models import train as trainer
from benchmarks.models.llama import Llama, LlamaShape
from benchmarks.models.pair import Gate, Phase, TrainingConfig
from benchmarks.models.tokenizer import train_tokenizer
from benchmarks.tasks.example import Example

TINY = TrainingConfig(
    name="test-tiny",
    shape=LlamaShape(vocab_size=1024, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=128),
    phases=(Phase(steps=16, seq_len=256, rows=2, recall_tokens=(40, 160)),
            Phase(steps=4, seq_len=512, rows=1, recall_tokens=(160, 400))),
    lr=1e-2,
    warmup_steps=2,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TINY.shape.vocab_size)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLLM_ADAPTIVE_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ADAPTIVE_CACHE", str(root))
        return trainer.ensure_trained(TINY, log=lambda _: None)


def test_training_twice_gives_identical_weights(tokenizer) -> None:
    first, _, _ = trainer.train_model(TINY, tokenizer, log=lambda _: None)
    second, _, _ = trainer.train_model(TINY, tokenizer, log=lambda _: None)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_loss_decreases(trained_folder: Path) -> None:
    losses = [h["loss"] for h in json.loads((trained_folder / "training.json").read_text())["history"]]
    assert len(losses) == TINY.steps
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1.0


def test_folder_is_a_hugging_face_llama_with_tokenizer(trained_folder: Path) -> None:
    config = json.loads((trained_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 32  # vLLM's CPU attention
    assert config["num_hidden_layers"] == TINY.shape.num_layers
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (trained_folder / name).is_file(), name
    record = json.loads((trained_folder / "training.json").read_text())
    assert record["config"] == json.loads(json.dumps(TINY.to_json()))


def test_saved_weights_compute_what_the_trained_model_computes(trained_folder: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ours = Llama(TINY.shape)
    ours.load_state_dict(load_file(trained_folder / "model.safetensors"))
    hf = AutoModelForCausalLM.from_pretrained(trained_folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(trained_folder)("Q: 12+7\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_second_call_reuses_the_cache(trained_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_ADAPTIVE_CACHE", str(trained_folder.parent.parent))
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert trainer.ensure_trained(TINY) == trained_folder


def test_cache_key_changes_with_the_config() -> None:
    data = trainer.data_fingerprint()
    other = TrainingConfig(**{**TINY.__dict__, "lr": 2e-2})
    assert trainer.cache_key(TINY, "tok", data) != trainer.cache_key(other, "tok", data)
    assert trainer.cache_key(TINY, "tok", data) != trainer.cache_key(TINY, "tok2", data)
    assert trainer.cache_key(TINY, "tok", data) != trainer.cache_key(TINY, "tok", data + "x")


def test_interrupted_training_leaves_no_model(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.ensure_trained(TINY, log=lambda _: None)
    assert list((cache / "models").glob("test-tiny-*")) == []  # no folder a later call could take as done


def test_packing_keeps_documents_whole_and_restarts_positions(tokenizer) -> None:
    examples = [Example("arith", "Q: 1+2\n", "3", "0100+0200=0300\nanswer: 0003"),
                Example("text", "Once.", "", " The end."),
                Example("arith", "Q: 5+5\n", "10", "0500+0500=0010\nanswer: 0010")]
    units = [trainer.make_unit([d]) for d in trainer.encode_documents(tokenizer, examples, {"arith": 0.0, "text": 1.0})]
    rows = trainer.pack(units * 40, seq_len=64, rows=3, pad_id=0)
    assert rows is not None and rows.inputs.shape == (3, 64)
    for r in range(3):
        docs = rows.documents[r]
        for d in docs.unique().tolist():
            if d < 0:
                assert rows.weights[r][docs == d].sum() == 0  # padding carries no loss
                continue
            span = (docs == d).nonzero().flatten()
            assert span.numel() in [len(u) for u in units] and span.diff().eq(1).all()  # whole, contiguous
            assert rows.positions[r, span].tolist() == list(range(span.numel()))
            assert rows.inputs[r, span[0]] == tokenizer.token_to_id("<s>")


def recall_example() -> Example:
    from benchmarks.tasks.mixture import training_examples

    return training_examples(3, 1, {"recall": 1.0}, recall_tokens=(80, 120))[0]


def test_recall_siblings_share_the_haystack_and_answer_other_keys() -> None:
    from benchmarks.tasks import recall
    from benchmarks.tasks.example import split_of

    example = recall_example()
    siblings = trainer.recall_siblings(example, 5)
    haystack = example.prompt.rsplit("query:", 1)[0]
    assert len(siblings) == 5 and len({s.prompt for s in siblings + [example]}) == 6
    for sibling in siblings:
        assert sibling.prompt.startswith(haystack) and split_of("recall", sibling.prompt) == "train"
        assert recall.is_correct(sibling, sibling.completion)
        key = sibling.prompt.rsplit(" ", 1)[1].rstrip("=")
        assert f"\n{key}={sibling.answer}\n" in "\n" + haystack


def test_documents_sharing_a_haystack_tokenize_as_each_alone(tokenizer) -> None:
    example = recall_example()
    group = [example, *trainer.recall_siblings(example, 4)]
    for (ids, weights, _), document in zip(trainer.encode_documents(tokenizer, group, {"recall": 0.0}), group):
        alone = tokenizer.encode(document.text, add_special_tokens=False).ids
        assert ids == [tokenizer.token_to_id("<s>"), *alone, tokenizer.token_to_id("</s>")]
        assert weights.count(1.0) == len(tokenizer.encode(document.completion, add_special_tokens=False).ids) + 1


def test_copy_documents_repeat_their_tokens_with_loss_on_the_repeat_only() -> None:
    phase = Phase(steps=2, seq_len=128, rows=2, recall_tokens=(40, 90), copy_tokens=16)
    units = trainer.copy_units(TINY, 0, phase, 1024, 10)
    assert units == trainer.copy_units(TINY, 0, phase, 1024, 10)  # deterministic
    assert len({u.inputs for u in units}) == 10
    for unit in units:
        ids = (*unit.inputs, unit.targets[-1])
        assert ids[0] == 1 and ids[1:17] == ids[17:] and min(ids[1:]) >= 3 and max(ids) < 1024
        assert unit.weights == (0.0,) * 16 + (1.0,) * 16 and unit.positions == tuple(range(32))
    rows = trainer.phase_rows(TINY, 0, phase, train_tokenizer(1024))
    assert rows.inputs.shape == (4, 128) and (rows.tasks[rows.tasks >= 0] == trainer.TASK_ORDER.index("copy")).all()


def test_a_phase_with_its_own_lr_holds_it_outside_the_shared_schedule() -> None:
    own = Phase(steps=10, seq_len=256, rows=1, recall_tokens=(40, 160), lr=1e-3)
    config = TrainingConfig(**{**TINY.__dict__, "phases": (own, *TINY.phases)})
    assert config.scheduled_steps == TINY.steps
    assert trainer.learning_rate(config, 0, None, own, 0) == pytest.approx(1e-3 / config.warmup_steps)
    assert trainer.learning_rate(config, 0, None, own, 7) == pytest.approx(1e-3)
    shared = config.phases[1]
    assert trainer.learning_rate(config, 0, None, shared, 0) == pytest.approx(config.lr / config.warmup_steps)
    assert trainer.learning_rate(config, config.scheduled_steps, None, shared, 0) == pytest.approx(
        config.lr * config.min_lr_ratio, rel=1e-2)


def test_a_shared_prefix_unit_gives_each_document_its_own_loss(tokenizer) -> None:
    example = recall_example()
    group = [example, *trainer.recall_siblings(example, 3)]
    documents = trainer.encode_documents(tokenizer, group, {"recall": 0.0})
    torch.manual_seed(0)
    model = Llama(TINY.shape, initializer_range=0.1).eval()

    def losses(rows) -> torch.Tensor:
        with torch.no_grad():
            logits = model(rows.inputs, rows.positions, trainer.attention_mask(rows.documents, rows.branches))
        per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), rows.targets, reduction="none")
        return per_token[rows.weights > 0]

    unit = trainer.make_unit(documents)
    assert len(unit) < sum(len(ids) - 1 for ids, _, _ in documents)  # the haystack counted once
    shared = trainer.pack([unit], seq_len=len(unit), rows=1, pad_id=0)
    alone = torch.cat([losses(trainer.pack([trainer.make_unit([d])], seq_len=len(d[0]) - 1, rows=1, pad_id=0))
                       for d in documents])
    torch.testing.assert_close(losses(shared), alone, rtol=1e-4, atol=1e-4)


def test_arith_prompts_carry_no_loss_and_completions_do(tokenizer) -> None:
    example = Example("arith", "Q: 1+2\n", "3", "0100+0200=0300\nanswer: 0003")
    [(ids, weights, task)] = trainer.encode_documents(tokenizer, [example], {"arith": 0.0})
    prompt_tokens = len(tokenizer.encode(example.prompt, add_special_tokens=False).ids)
    assert len(weights) == len(ids) - 1
    assert weights[:prompt_tokens] == [0.0] * prompt_tokens
    assert set(weights[prompt_tokens:]) == {1.0}
    assert ids[-1] == tokenizer.token_to_id("</s>")
    assert trainer.TASK_ORDER[task] == "arith"


def test_attention_by_spans_equals_the_dense_mask(tokenizer) -> None:
    example = recall_example()
    recall_unit = trainer.make_unit(trainer.encode_documents(
        tokenizer, [example, *trainer.recall_siblings(example, 3)], {"recall": 0.0}))
    arith = Example("arith", "Q: 12+7\n", "19", "0012+0007=0019\nanswer: 0019")
    arith_unit = trainer.make_unit(trainer.encode_documents(tokenizer, [arith], {"arith": 0.0}))
    copy_phase = Phase(steps=1, seq_len=64, rows=1, recall_tokens=(10, 20), copy_tokens=8)
    units = [arith_unit, recall_unit, *trainer.copy_units(TINY, 0, copy_phase, 1024, 3), arith_unit]
    rows = trainer.pack(units, seq_len=len(recall_unit) + 40, rows=2, pad_id=0)
    assert rows is not None and (rows.documents == -1).any() and (rows.branches > 1).any()  # padding, branches
    spans = trainer.attention_spans(rows.documents, rows.branches)
    assert [s.end for s in spans[0]][-1] == rows.inputs.shape[1] and any(s.branch_mask is not None for r in spans for s in r)
    torch.manual_seed(0)
    model = Llama(TINY.shape, initializer_range=0.1)

    def run(mask) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(rows.inputs, rows.positions, mask)
        (logits[rows.weights > 0].logsumexp(-1).sum()).backward()
        return logits, [p.grad.clone() for p in model.parameters()]

    dense_logits, dense_grads = run(trainer.attention_mask(rows.documents, rows.branches))
    span_logits, span_grads = run(spans)
    torch.testing.assert_close(span_logits, dense_logits, rtol=1e-4, atol=1e-5)
    for span_grad, dense_grad in zip(span_grads, dense_grads):
        torch.testing.assert_close(span_grad, dense_grad, rtol=1e-4, atol=1e-5)


def test_attention_stays_inside_each_document() -> None:
    mask = trainer.attention_mask(torch.tensor([[0, 0, 1, 1, -1]]), torch.zeros(1, 5, dtype=torch.long))[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, False, False, True],
    ]


def test_block_expansion_computes_the_same_function() -> None:
    from benchmarks.models.llama import expand_depth

    torch.manual_seed(0)
    shallow = Llama(LlamaShape(vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                               intermediate_size=96, tie_word_embeddings=True), initializer_range=0.1).eval()
    deep = expand_depth(shallow, 6).eval()
    ids = torch.randint(0, 300, (2, 19))
    assert deep.shape.num_layers == 6 and deep.lm_head.weight is deep.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(shallow(ids), deep(ids))


def test_branches_see_the_shared_prefix_and_themselves_only() -> None:
    mask = trainer.attention_mask(torch.tensor([[0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 1, 2, 2]]))[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, False, True, False],
        [True, True, False, True, True],
    ]


def test_phases_can_grow_the_model_to_its_final_depth(tokenizer) -> None:
    grown = TrainingConfig(**{**TINY.__dict__, "shape": LlamaShape(
        vocab_size=1024, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
        tie_word_embeddings=True), "phases": (dataclasses.replace(TINY.phases[0], steps=3, layers=1),
                                                dataclasses.replace(TINY.phases[1], steps=2))})
    model, history, _ = trainer.train_model(grown, tokenizer, log=lambda _: None)
    assert model.shape.num_layers == 2 and len(history) == 5


def test_phase_depths_must_grow_by_multiples() -> None:
    with pytest.raises(ValueError, match="whole multiples"):
        TrainingConfig(**{**TINY.__dict__, "shape": dataclasses.replace(TINY.shape, num_layers=3),
                          "phases": (dataclasses.replace(TINY.phases[0], layers=2), TINY.phases[1])})


def _gated(bar: float, max_extensions: int = 2) -> TrainingConfig:
    extension = dataclasses.replace(TINY.phases[0], steps=3, lr=1e-3)
    gate = Gate(after_phase=0, accuracy=(("arith", bar),), extension=extension, n=4, max_extensions=max_extensions)
    return dataclasses.replace(TINY, gate=gate)


def test_the_gate_s_cap_is_not_part_of_the_recipe_key_but_its_bars_are() -> None:
    # A run that passes after r rounds trains the same weights under any cap >= r.
    assert _gated(0.5, max_extensions=2).digest() == _gated(0.5, max_extensions=16).digest()
    assert _gated(0.5).digest() != _gated(0.6).digest() != TINY.digest()
    assert "max_extensions" not in _gated(0.5).to_json()["gate"]


def test_a_gate_that_passes_leaves_the_recipe_s_weights_unchanged(tokenizer) -> None:
    plain, plain_history, _ = trainer.train_model(TINY, tokenizer, log=lambda _: None)
    gated, history, rounds = trainer.train_model(_gated(0.0), tokenizer, log=lambda _: None)
    assert [r["passed"] for r in rounds] == [True] and len(history) == len(plain_history) == TINY.steps
    for (name, a), (_, b) in zip(plain.state_dict().items(), gated.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_gate_below_its_bar_trains_extensions_up_to_the_cap(tokenizer) -> None:
    # A bar above 1.0 is never reached: every extension round runs, then the recipe goes on.
    _, history, rounds = trainer.train_model(_gated(1.01, max_extensions=2), tokenizer, log=lambda _: None)
    assert [r["round"] for r in rounds] == [0, 1, 2] and not any(r["passed"] for r in rounds)
    assert len(history) == TINY.steps + 2 * 3
    assert [h["phase"] for h in history].count(0) == TINY.phases[0].steps + 2 * 3


def test_gate_accuracy_scores_greedy_completions_with_the_task_s_checker(tokenizer) -> None:
    """A model that always writes EOS first answers nothing: accuracy 0 on arith."""
    model = Llama(TINY.shape)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[2] = 1.0  # EOS (id 2) has the largest logit everywhere
    gate = _gated(0.5).gate
    assert trainer.gate_accuracy(model, tokenizer, gate) == {"arith": 0.0}
    assert trainer.greedy_texts(model, tokenizer, ["1+1="], max_tokens=5) == [""]
