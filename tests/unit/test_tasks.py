"""The task generators (benchmarks/tasks) and the project tokenizer they are trained with.

Answers are recomputed here independently of the generators' own code; held-out and training
streams are checked disjoint; token counts are measured with the real tokenizer.
"""

from __future__ import annotations

import random
import re

import pytest

from benchmarks.models.pair import VOCAB_SIZE as PAIR_VOCAB_SIZE
from benchmarks.models.tokenizer import BOS, EOS, PAD, train_tokenizer
from benchmarks.tasks import arith, recall, text
from benchmarks.tasks.example import EVAL_BUCKETS, split_of
from benchmarks.tasks.mixture import (
    EVAL_SEED, TASKS, TRAIN_SEED, eval_examples, training_examples, training_texts,
)

VOCAB_SIZE = PAIR_VOCAB_SIZE  # the trained pair's vocabulary, which the task formats are made for


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(VOCAB_SIZE)


def ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=special).ids


# ---- arith -------------------------------------------------------------------------------------

def arith_examples(n: int = 300, seed: int = 3) -> list:
    rng = random.Random(seed)
    return [arith.generate(rng) for _ in range(n)]


def unreverse(field: str) -> int:
    assert re.fullmatch(r"\d{4}", field), field
    return int(field[::-1])


def test_arith_answer_is_the_value_of_the_question() -> None:
    for example in arith_examples():
        question = re.fullmatch(r"Q: ([0-9+-]+)\n", example.prompt).group(1)
        tokens = re.findall(r"[+-]|\d+", question)
        value = int(tokens[0])
        for op, operand in zip(tokens[1::2], tokens[2::2]):
            value = value + int(operand) if op == "+" else value - int(operand)
        assert example.answer == str(value)
        assert arith.extract_answer(example.completion) == str(value)
        assert arith.is_correct(example, example.completion)


def test_arith_scratchpad_lines_are_true_equations_on_reversed_digits() -> None:
    for example in arith_examples():
        question = re.findall(r"[+-]|\d+", example.prompt[3:])
        lines = example.completion.split("\n")
        conversion, steps, final = lines[0], lines[1:-1], lines[-1]
        assert re.findall(r"[+-]|\d{4}", conversion) == [
            tok if tok in "+-" else str(int(tok)).zfill(4)[::-1] for tok in question
        ]
        assert len(steps) == len(question) // 2
        total = int(question[0])
        for step, op, operand in zip(steps, question[1::2], question[2::2]):
            left, sign, right, result = re.fullmatch(r"(\d{4})([+-])(\d{4})=(\d{4})", step).groups()
            assert (unreverse(left), sign, unreverse(right)) == (total, op, int(operand))
            total = total + int(operand) if op == "+" else total - int(operand)
            assert unreverse(result) == total >= 0
        assert final == f"answer: {total:04d}"


def test_arith_difficulty_follows_the_spec() -> None:
    examples = arith_examples(500)
    n_ops = {len(re.findall(r"[+-]", e.prompt)) for e in examples}
    digits = {len(d) for e in examples for d in re.findall(r"\d+", e.prompt)}
    assert n_ops == {2, 3, 4} and digits == {2, 3}
    spec = arith.ArithSpec(min_ops=1, max_ops=1, min_digits=1, max_digits=1)
    rng = random.Random(0)
    assert all(len(re.findall(r"[+-]", arith.generate(rng, spec).prompt)) == 1 for _ in range(50))


def test_arith_spec_refuses_totals_wider_than_the_scratchpad() -> None:
    with pytest.raises(ValueError, match="exceed 4 digits"):
        arith.ArithSpec(max_ops=10, max_digits=3)


def test_arith_extract_answer_reads_the_first_answer_line() -> None:
    assert arith.extract_answer("0720+1080=1701\nanswer: 1071\nanswer: 5") == "1071"
    assert arith.extract_answer("answer: 0270") == "270"
    assert arith.extract_answer("answer: twelve") is None
    assert arith.extract_answer("1701") is None


# ---- recall ------------------------------------------------------------------------------------

def test_recall_answer_is_the_value_of_the_queried_key() -> None:
    rng = random.Random(5)
    for _ in range(50):
        filler = rng.random() < 0.5
        example = recall.generate(rng, prompt_tokens=rng.randint(recall.MIN_PROMPT_TOKENS, 1500 if filler else 900),
                                  filler=filler)
        *lines, query_line = example.prompt.split("\n")
        pairs = [line.split("=") for line in lines if "=" in line]
        fillers = [line for line in lines if "=" not in line]
        keys = [k for k, _ in pairs]
        assert pairs and len(set(keys)) == len(keys)
        assert all(k in recall.KEYS and v in recall.VALUES for k, v in pairs)
        assert all(text.is_grammatical(line) for line in fillers)
        key = re.fullmatch(r"query: ([a-z]+)=", query_line).group(1)
        assert example.answer == dict(pairs)[key]
        assert example.completion == f"{example.answer}\n"
        assert recall.extract_answer(example.completion) == example.answer
        assert recall.is_correct(example, example.completion)
        assert recall.is_correct(example, f" {example.answer}\nanything after the first line")


def test_recall_queried_pair_depth_is_uniform() -> None:
    rng = random.Random(9)
    depths = []
    for _ in range(400):
        example = recall.generate(rng, prompt_tokens=400)
        keys = [k for k, _ in recall.pairs_of(example.prompt)]
        depths.append(keys.index(example.prompt.rpartition("query: ")[2][:-1]) / len(keys))
    assert 0.4 < sum(depths) / len(depths) < 0.6
    assert min(depths) < 0.05 and max(depths) > 0.9


def test_recall_ask_puts_another_key_to_the_same_haystack() -> None:
    example = recall.generate(random.Random(2), prompt_tokens=300)
    haystack = recall.haystack_of(example)
    assert haystack and example.prompt == f"{haystack}query: {example.prompt.rpartition(' ')[2]}"
    key, value = recall.pairs_of(haystack)[0]
    other = recall.ask(haystack, key, value)
    assert recall.haystack_of(other) == haystack and other.prompt.endswith(f"query: {key}=")
    assert other.answer == value and recall.is_correct(other, other.completion)


def test_recall_refuses_lengths_it_cannot_make() -> None:
    with pytest.raises(ValueError, match="prompt_tokens must be in"):
        recall.generate(random.Random(0), prompt_tokens=recall.MIN_PROMPT_TOKENS - 1)
    with pytest.raises(ValueError, match="needs more than the 320 keys"):
        recall.generate(random.Random(0), prompt_tokens=1500, filler=False)


@pytest.mark.parametrize("target", [200, 777, 1500, 2000])
def test_recall_prompt_reaches_the_requested_token_length(tokenizer, target: int) -> None:
    for filler in (True, False):
        if not filler and target > 900:
            continue
        example = recall.generate(random.Random(target), prompt_tokens=target, filler=filler)
        length = len(ids(tokenizer, example.prompt, special=True))  # BOS included, as vLLM sees it
        assert target - recall.MAX_LINE_TOKENS < length <= target


def test_default_recall_prompt_is_about_1500_tokens(tokenizer) -> None:
    for example in eval_examples("recall", EVAL_SEED, 5):
        assert 1500 - recall.MAX_LINE_TOKENS < len(ids(tokenizer, example.prompt, special=True)) <= 1500
        assert len(recall.pairs_of(example.prompt)) > 80


# ---- text --------------------------------------------------------------------------------------

def test_text_stories_are_grammatical_sentence_by_sentence() -> None:
    rng = random.Random(2)
    for _ in range(200):
        example = text.generate(rng)
        sentences = re.findall(r"[^.]*\.", example.text)
        assert 5 <= len(sentences) <= 7
        assert all(text.is_grammatical(s) for s in sentences), example.text
        assert text.is_correct(example, example.completion)


def test_text_grammar_refuses_what_no_template_makes() -> None:
    assert text.is_grammatical("One day Tom went to the park.")
    assert not text.is_grammatical("One day Tom went to the moon.")
    assert not text.is_grammatical("day One Tom went to the park.")
    assert not text.is_correct(text.generate(random.Random(0)), " Tom Tom Tom")  # no sentence ends


# ---- splits, seeds, mixture --------------------------------------------------------------------

@pytest.mark.parametrize("task", sorted(TASKS))
def test_eval_examples_are_held_out_and_never_in_training(task: str) -> None:
    held_out = eval_examples(task, EVAL_SEED, 40)
    assert all(split_of(task, e.prompt) == "eval" for e in held_out)
    # the same seed on both sides still cannot collide: the split is a property of the prompt
    for seed in (TRAIN_SEED, EVAL_SEED):
        trained = training_examples(seed, 300, {task: 1.0}, recall_tokens=(200, 1500))
        assert all(split_of(task, e.prompt) == "train" for e in trained)
        assert not {e.prompt for e in held_out} & {e.prompt for e in trained}


def test_about_one_in_eval_buckets_prompts_is_held_out() -> None:
    rng = random.Random(0)
    prompts = [arith.generate(rng).prompt for _ in range(4000)]
    held_out = sum(split_of("arith", p) == "eval" for p in prompts) / len(prompts)
    assert abs(held_out - 1 / EVAL_BUCKETS) < 0.02


@pytest.mark.parametrize("task", sorted(TASKS))
def test_eval_examples_are_determined_by_seed_and_stable_in_n(task: str) -> None:
    assert eval_examples(task, 7, 6) == eval_examples(task, 7, 6)
    assert eval_examples(task, 7, 3) == eval_examples(task, 7, 6)[:3]
    assert eval_examples(task, 7, 6) != eval_examples(task, 8, 6)


def test_training_texts_are_deterministic_documents() -> None:
    docs = training_texts(TRAIN_SEED, 60)
    assert docs == training_texts(TRAIN_SEED, 60)
    assert docs != training_texts(TRAIN_SEED + 1, 60)
    assert len(docs) == 60 and all(isinstance(d, str) and d for d in docs)
    assert not any(BOS in d or EOS in d or PAD in d for d in docs)
    examples = training_examples(TRAIN_SEED, 60)
    assert [e.prompt + e.completion for e in examples] == docs


def test_training_mixture_follows_weights() -> None:
    examples = training_examples(0, 2000, {"arith": 0.75, "text": 0.25})
    share = sum(e.task == "arith" for e in examples) / len(examples)
    assert {e.task for e in examples} == {"arith", "text"}
    assert abs(share - 0.75) < 0.04


def test_training_recall_length_can_be_a_range(tokenizer) -> None:
    examples = training_examples(0, 40, {"recall": 1.0}, recall_tokens=(100, 400))
    lengths = [len(ids(tokenizer, e.prompt, special=True)) for e in examples]
    assert 100 - recall.MAX_LINE_TOKENS < min(lengths) and max(lengths) <= 400
    assert len(set(lengths)) > 5


def test_mixture_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown task 'math'; known tasks"):
        training_texts(0, 1, {"math": 1.0})
    with pytest.raises(ValueError, match="weight of 'arith' must be >= 0"):
        training_texts(0, 1, {"arith": -1.0})
    with pytest.raises(ValueError, match="positive weight"):
        training_texts(0, 1, {"arith": 0.0})
    with pytest.raises(ValueError, match="unknown task"):
        eval_examples("math", 0, 1)


# ---- tokenizer ---------------------------------------------------------------------------------

def test_specials_have_fixed_ids(tokenizer) -> None:
    assert [tokenizer.token_to_id(t) for t in (PAD, BOS, EOS)] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == VOCAB_SIZE


def test_every_digit_is_one_token(tokenizer) -> None:
    for number in ("0", "7", "42", "1071", "9930", "0000", "31415926535"):
        pieces = [tokenizer.id_to_token(i) for i in ids(tokenizer, number)]
        assert pieces == list(number)
    assert len(ids(tokenizer, "answer: 1071")) == len(ids(tokenizer, "answer: 9")) + 3


def test_task_words_keys_and_values_are_single_tokens_wherever_they_stand(tokenizer) -> None:
    for key in recall.KEYS:
        [key_id] = ids(tokenizer, f"{key}=")
        assert ids(tokenizer, f"query: {key}=")[-1] == key_id  # in the query line
        first = f"{recall.KEYS[0]}={recall.VALUES[0]}\n"
        assert ids(tokenizer, f"{first}{key}={recall.VALUES[-1]}\n")[3] == key_id  # at the start of a pair line
    for value in recall.VALUES:
        [value_id] = ids(tokenizer, value)
        assert ids(tokenizer, f"{recall.KEYS[-1]}={value}\n")[1] == value_id
    for word in [w for words in text.WORDS.values() for w in words] + list(text.HEROES):
        assert len(ids(tokenizer, word)) == 1, word


def test_arith_lines_have_a_fixed_token_length(tokenizer) -> None:
    for example in arith_examples(50):
        lines = example.completion.split("\n")
        assert {len(ids(tokenizer, line)) for line in lines[1:-1]} == {14}
        assert len(ids(tokenizer, lines[-1])) == len(ids(tokenizer, "answer: ")) + 4


@pytest.mark.parametrize("task", sorted(TASKS))
def test_prompt_and_completion_tokenize_the_same_apart_and_together(tokenizer, task: str) -> None:
    for example in eval_examples(task, EVAL_SEED, 5):
        assert ids(tokenizer, example.prompt) + ids(tokenizer, example.completion) == ids(tokenizer, example.text)
        assert tokenizer.decode(ids(tokenizer, example.text)) == example.text


def test_tokenizer_is_deterministic(tokenizer) -> None:
    assert train_tokenizer(VOCAB_SIZE).to_str() == tokenizer.to_str()
