"""The project's BPE tokenizer, trained deterministically on text from the task generators.

No model hub is reachable, so every model the project serves uses this tokenizer: byte-level
BPE (nothing is ever unknown), with `<pad>`, `<s>`, `</s>` specials (ids 0, 1, 2) and a small
chat template so `/v1/chat/completions` works.

Pre-tokenization is chosen for the tasks (benchmarks/tasks): every digit is its own token, so
numbers have one token per digit and arithmetic lines a fixed length; spaces are tokens of
their own, so a word is the same token wherever it stands; and a lowercase word directly
followed by `=` stays one piece, so a recall key with its `=` (`rod=`) is one token, in the pair
line and in the query alike, which makes the recall lookup a single match. The BPE merges are
learnt from the task generators' training stream (plus a few chat lines), so the vocabulary
covers the tasks: from 1536 tokens up (the trained pair's vocabulary) every recall key (with
`=`), every recall value and every word of the text grammar is a single token.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

# Documents of the training stream the merges are learnt from; recall documents are kept short
# (the vocabulary only needs each key often, not long contexts) so training takes ~1 s.
CORPUS_DOCUMENTS = 3000
CORPUS_RECALL_TOKENS = 200

# General English for prompts outside the tasks (chat, demos): rarer than any task word, so its
# merges come after the tasks' and only fill what a larger vocabulary leaves.
_GENERAL_WORDS = (
    "the a an and or but if then else when while of to in on at by for with from as is are was "
    "were be been it this that these those there here what which who how why can will would "
    "should could may might must do does did done have has had not no yes all any some many few "
    "more most less one two three four five six seven eight nine ten zero hundred thousand "
    "time day year way thing man woman child world life hand part place case week company "
    "system program question work number night point home water room mother area money story "
    "fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city community name president team "
    "minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher "
    "force education model server request token cache memory key value query answer sum total "
    "add subtract multiply divide equals step first second third next finally compute result "
    "small large fast slow good new old great high little long short early late young important "
    "hello world please thank you user assistant"
).split()


def corpus_lines(seed: int = 1234, n_documents: int = CORPUS_DOCUMENTS) -> list[str]:
    """Deterministic tokenizer training text: task documents, chat turns and general sentences."""
    from benchmarks.tasks.mixture import training_texts
    from benchmarks.tasks.text import generate as story

    documents = training_texts(seed, n_documents, {"arith": 0.4, "recall": 0.3, "text": 0.3},
                               recall_tokens=CORPUS_RECALL_TOKENS)
    rng = random.Random(seed)
    chats = [f"user: {story(rng).prompt}\nassistant: {story(rng).prompt}" for _ in range(n_documents // 20)]
    general = [
        " ".join(rng.choice(_GENERAL_WORDS) for _ in range(rng.randint(5, 16))).capitalize() + "."
        for _ in range(n_documents // 5)
    ]
    return documents + chats + general


# GPT-2's split into letters, numbers, other symbols and whitespace, with one addition ahead of
# it: a lowercase word directly followed by `=` stays one piece (a recall key, `rod=`).
_PIECES = r"[a-z]+=| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" "), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(vocab_size: int, seed: int = 1234) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(seed), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json and the config transformers' AutoTokenizer reads."""
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
