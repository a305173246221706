"""The project's BPE tokenizer, trained deterministically on a synthetic corpus.

No model hub is reachable, so every model the project serves uses this tokenizer: byte-level
BPE (nothing is ever unknown), with `<s>`, `</s>` and `<pad>` specials and a small chat
template so `/v1/chat/completions` works. The corpus covers words, digits and arithmetic so
later task models (arith, recall) share the same vocabulary.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [PAD, BOS, EOS]  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)

_WORDS = (
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
    "small large fast slow good new old great high little long short early late young important"
).split()


def corpus_lines(seed: int = 1234, n_lines: int = 4000) -> list[str]:
    """Deterministic training text: sentences, key/value lines and arithmetic."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            words = [rng.choice(_WORDS) for _ in range(rng.randint(5, 16))]
            lines.append(" ".join(words).capitalize() + ".")
        elif kind == 1:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            value = a + b if op == "+" else a - b if op == "-" else a * b
            lines.append(f"Q: {a} {op} {b} = ?\nA: {value}")
        elif kind == 2:
            key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
            lines.append(f"key {key} = {rng.randint(0, 99999)};")
        else:
            lines.append(f"user: {rng.choice(_WORDS)} {rng.choice(_WORDS)}?\nassistant: ok.")
    return lines


def train_tokenizer(vocab_size: int, seed: int = 1234) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
