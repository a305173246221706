"""Train the project's draft, target and small models on CPU, deterministically, and cache them.

    python -m benchmarks.models.train                    # draft and target (cached after the first run)
    python -m benchmarks.models.train --model small --verify --ship   # EAD's small model into models/
    python -m benchmarks.models.train --model target --print-path   # for scripts: the folder only
    python -m benchmarks.models.train --check 100        # plus a quick held-out accuracy check
    python -m benchmarks.models.train --verify           # `make train`: vLLM figures vs the shipped pair
    python -m benchmarks.models.train --verify --ship    # write the trained pair into models/

Each model is a Llama (`benchmarks.models.llama`) trained from scratch on the task mixture of
`benchmarks.tasks.mixture` (arith with a worked scratchpad, key-value recall in long contexts,
stories), with the recipe in `benchmarks.models.pair`. What makes minutes of CPU enough:

- documents are packed into rows, each token attending only within its own document and
  positions restarting at each document, so no compute goes to padding or to attention across
  unrelated documents, and every document looks like an evaluation prompt (BOS at position 0);
- loss only where there is something to learn: task completions and EOS (prompts of arith and
  recall are random numbers and keys), plus the text prompts;
- a curriculum on recall length: short haystacks first, where the lookup (an induction head) is
  learnt cheaply, then full-length ones;
- attention computed per unit (`attention_spans`), not as one masked t x t product per row;
- AdamW with linear warmup and cosine decay, fixed seeds, a fixed thread count and
  deterministic algorithms.

Results are cached under `$VLLM_ADAPTIVE_CACHE/models` (default `~/.cache/vllm-adaptive/models`)
in a folder named after the model and a hash of everything that decides the weights: the
training config, this trainer's version, the tokenizer and a sample of the task data. A model is
trained into a temporary folder and renamed into place when complete, so an interrupted run never
leaves a folder that looks finished; a lock keeps two processes from training the same model.
Progress (loss, tokens/s, ETA) goes to stderr; stdout carries only the model folders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.models.pair import CONFIGS, PAIR, Gate, Phase, TrainingConfig
from benchmarks.models.tiny import cache_root

if TYPE_CHECKING:
    import torch

    from benchmarks.models.llama import Spans

TRAINER_VERSION = 3  # 3: attention per unit (attention_spans); the gate is part of the config
PACKING_WINDOW = 16  # open rows a document may be placed into (first fit)


# --- cache -----------------------------------------------------------------------------------

def data_fingerprint() -> str:
    """A hash of sample task data: changes when a task generator's output changes."""
    from benchmarks.tasks.mixture import TASKS, eval_examples, training_examples

    sample = training_examples(0, 60, recall_tokens=(60, 300))
    sample += [e for task in TASKS for e in eval_examples(task, n=3)]
    blob = json.dumps([dataclasses.asdict(e) for e in sample])
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_key(config: TrainingConfig, tokenizer_json: str, data: str) -> str:
    blob = json.dumps({"config": config.digest(), "trainer": TRAINER_VERSION,
                       "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest(), "data": data})
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def model_dir(config: TrainingConfig, key: str) -> Path:
    return cache_root() / "models" / f"{config.name}-{key}"


def is_complete(path: Path) -> bool:
    return (path / "training.json").is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_trained(config: TrainingConfig, *, force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """The folder of `config`'s trained model, training it first if it is not cached."""
    from benchmarks.models.tokenizer import train_tokenizer

    log = log or _stderr
    tokenizer = train_tokenizer(config.shape.vocab_size)
    key = cache_key(config, tokenizer.to_str(), data_fingerprint())
    target = model_dir(config, key)
    if is_complete(target) and not force:
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if is_complete(target) and not force:  # trained by another process meanwhile
            return target
        log(f"training {config.name} ({config.shape.parameter_count() / 1e6:.2f}M parameters, "
            f"{config.steps} steps, {config.tokens / 1e6:.1f}M tokens) into {target}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            train(config, tokenizer, tmp, key=key, log=log)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- data ------------------------------------------------------------------------------------

TASK_ORDER = ("arith", "recall", "text", "copy")  # task ids in PackedRows.tasks


@dataclasses.dataclass
class PackedRows:
    """Rows of packed units: inputs, next-token targets, loss weights, positions, unit ids
    (-1 = padding), branch ids (0 = a unit's shared part, k = its k-th branch) and task ids
    (for per-task loss logs), each [rows, seq_len]."""

    inputs: "torch.Tensor"
    targets: "torch.Tensor"
    weights: "torch.Tensor"
    positions: "torch.Tensor"
    documents: "torch.Tensor"
    branches: "torch.Tensor"
    tasks: "torch.Tensor"


@dataclasses.dataclass(frozen=True)
class Unit:
    """What packing places in a row: one document, or documents sharing a token prefix laid out
    as the prefix once and then each document's remainder (a branch) at the positions it has in
    its own document. A branch attends to the prefix and to itself only, so every document's
    loss is exactly its loss alone, while the prefix (a recall haystack) is computed once."""

    inputs: tuple[int, ...]
    targets: tuple[int, ...]
    weights: tuple[float, ...]
    positions: tuple[int, ...]
    branches: tuple[int, ...]
    task: int

    def __len__(self) -> int:
        return len(self.inputs)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, no specials: one `encode` call (`encode_batch` costs about 1 ms per
    call in thread start-up, more than the encoding of a document)."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def encode_documents(tokenizer, examples: Sequence, prompt_weight: dict[str, float]) -> list[tuple[list[int], list[float], int]]:
    """`[BOS] prompt completion [EOS]` token ids, the loss weight of predicting each token
    after the first, and the task id. Prompt and completion are tokenized apart, as in
    evaluation, where the prompt is encoded alone and the model writes the completion."""
    from benchmarks.models.tokenizer import BOS, EOS

    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    # Documents that share a haystack (recall queries) share its tokens: tokenize it once. Text
    # cut after a newline that a non-space follows tokenizes the same apart and together.
    shared = os.path.commonprefix([e.prompt for e in examples]) if len(examples) > 1 else ""
    shared = shared[:shared.rfind("\n") + 1]
    while shared and examples[0].prompt[len(shared):][:1].isspace():
        shared = shared[:shared[:-1].rfind("\n") + 1]
    head = _encode(tokenizer, shared) if shared else []
    documents = []
    for example in examples:
        prompt_ids = head + _encode(tokenizer, example.prompt[len(shared):])
        completion_ids = _encode(tokenizer, example.completion)
        ids = [bos, *prompt_ids, *completion_ids, eos]
        weights = [prompt_weight.get(example.task, 0.0)] * len(prompt_ids) + [1.0] * (len(completion_ids) + 1)
        documents.append((ids, weights, TASK_ORDER.index(example.task)))
    return documents


def make_unit(documents: Sequence[tuple[list[int], list[float], int]]) -> Unit:
    """One document, or several whose token ids share a prefix (see Unit)."""
    if len(documents) == 1:
        ids, weights, task = documents[0]
        n = len(ids) - 1
        return Unit(tuple(ids[:-1]), tuple(ids[1:]), tuple(weights), tuple(range(n)), (0,) * n, task)
    shortest = min(len(ids) for ids, _, _ in documents)
    common = 0
    while common < shortest and len({ids[common] for ids, _, _ in documents}) == 1:
        common += 1
    shared = common - 1  # positions whose next token is the same in every document
    if shared < 1:
        raise ValueError("documents grouped in one unit must share a prefix")
    ids0, weights0, task = documents[0]
    inputs, targets = list(ids0[:shared]), list(ids0[1:shared + 1])
    weights, positions, branches = list(weights0[:shared]), list(range(shared)), [0] * shared
    for k, (ids, w, _) in enumerate(documents, start=1):
        inputs += ids[shared:-1]
        targets += ids[shared + 1:]
        weights += w[shared:]
        positions += range(shared, len(ids) - 1)
        branches += [k] * (len(ids) - 1 - shared)
    return Unit(tuple(inputs), tuple(targets), tuple(weights), tuple(positions), tuple(branches), task)


def pack(units: Sequence[Unit], seq_len: int, rows: int, pad_id: int) -> PackedRows | None:
    """First-fit packing of whole units into `rows` rows of `seq_len` (None if too few)."""
    import torch

    closed: list[list[Unit]] = []
    open_rows: list[tuple[int, list[Unit]]] = []  # (free tokens, units)
    for unit in units:
        if len(unit) > seq_len:
            continue
        for i, (free, placed) in enumerate(open_rows):
            if len(unit) <= free:
                placed.append(unit)
                open_rows[i] = (free - len(unit), placed)
                break
        else:
            open_rows.append((seq_len - len(unit), [unit]))
            if len(open_rows) > PACKING_WINDOW:
                closed.append(open_rows.pop(0)[1])
        if len(closed) >= rows:
            break
    closed += [placed for _, placed in open_rows][:rows - len(closed)]
    if len(closed) < rows:
        return None
    shape = (rows, seq_len)
    inputs = torch.full(shape, pad_id, dtype=torch.long)
    targets = torch.full(shape, pad_id, dtype=torch.long)
    weights = torch.zeros(shape)
    positions = torch.zeros(shape, dtype=torch.long)
    documents = torch.full(shape, -1, dtype=torch.long)
    branches = torch.zeros(shape, dtype=torch.long)
    tasks = torch.full(shape, -1, dtype=torch.long)
    for r, placed in enumerate(closed[:rows]):
        at = 0
        for d, unit in enumerate(placed):
            span = slice(at, at + len(unit))
            inputs[r, span] = torch.tensor(unit.inputs)
            targets[r, span] = torch.tensor(unit.targets)
            weights[r, span] = torch.tensor(unit.weights)
            positions[r, span] = torch.tensor(unit.positions)
            branches[r, span] = torch.tensor(unit.branches)
            documents[r, span] = d
            tasks[r, span] = unit.task
            at += len(unit)
    return PackedRows(inputs, targets, weights, positions, documents, branches, tasks)


def recall_siblings(example, count: int) -> list:
    """Up to `count` more recall examples with `example`'s haystack and other queried keys
    (deterministic; training split only). Several queries per haystack give the lookup
    several supervised answers for one haystack's compute."""
    from benchmarks.tasks import recall
    from benchmarks.tasks.example import split_of

    haystack = recall.haystack_of(example)
    queried = example.prompt[len(haystack):].removeprefix("query: ").removesuffix("=")
    pairs = [(key, value) for key, value in recall.pairs_of(haystack) if key != queried]
    siblings = []
    for key, value in random.Random(example.prompt).sample(pairs, len(pairs)):
        sibling = recall.ask(haystack, key, value)
        if split_of(sibling.task, sibling.prompt) != "train":
            continue
        siblings.append(sibling)
        if len(siblings) == count:
            break
    return siblings


def phase_units(config: TrainingConfig, index: int, phase: Phase, tokenizer, n: int) -> list[Unit]:
    from benchmarks.tasks.mixture import training_examples

    weights = dict(phase.weights or config.weights)
    prompt_weight = dict(config.prompt_loss_weight)
    units = []
    for example in training_examples(config.seed * 1000 + index, n, weights, recall_tokens=phase.recall_tokens,
                                     recall_filler=phase.recall_filler):
        group = [example]
        if example.task == "recall" and phase.recall_queries > 1:
            group += recall_siblings(example, phase.recall_queries - 1)
        units.append(make_unit(encode_documents(tokenizer, group, prompt_weight)))
    return units


def copy_units(config: TrainingConfig, index: int, phase: Phase, vocab_size: int, n: int) -> list[Unit]:
    """n copy documents: BOS, `phase.copy_tokens` random token ids, the same ids again; loss on
    the repeat only. Every repeated token is predicted by finding the previous copy of the
    current token and reading the token after it, so these documents train an induction head,
    the circuit behind the recall lookup, with a dense signal: a 2-layer model has it after
    about 200 steps (docs/models_and_tasks.md). Ids exclude the specials (0-2)."""
    from benchmarks.models.tokenizer import BOS, SPECIAL_TOKENS

    rng = random.Random(f"vllm-adaptive/copy/{config.seed}/{index}")
    length = phase.copy_tokens
    units = []
    for _ in range(n):
        tokens = [rng.randrange(len(SPECIAL_TOKENS), vocab_size) for _ in range(length)]
        ids = [SPECIAL_TOKENS.index(BOS), *tokens, *tokens]
        weights = (0.0,) * length + (1.0,) * length
        units.append(Unit(tuple(ids[:-1]), tuple(ids[1:]), weights, tuple(range(2 * length)), (0,) * (2 * length),
                          TASK_ORDER.index("copy")))
    return units


def phase_rows(config: TrainingConfig, index: int, phase: Phase, tokenizer) -> PackedRows:
    """All rows of one phase, from its own seed (deterministic)."""
    from benchmarks.models.tokenizer import PAD

    rows = phase.steps * phase.rows
    if phase.copy_tokens:
        n = rows * (phase.seq_len // (2 * phase.copy_tokens))
        packed = pack(copy_units(config, index, phase, tokenizer.get_vocab_size(), n), phase.seq_len, rows,
                      tokenizer.token_to_id(PAD))
        assert packed is not None
        return packed
    weights = dict(phase.weights or config.weights)
    total = sum(weights.values())
    mean_recall = sum(phase.recall_tokens) / 2 + 8 * phase.recall_queries
    mean_unit = sum(w / total * (mean_recall if t == "recall" else 90) for t, w in weights.items())
    n = int(rows * phase.seq_len / mean_unit * 1.2) + 16
    while True:
        packed = pack(phase_units(config, index, phase, tokenizer, n), phase.seq_len, rows, tokenizer.token_to_id(PAD))
        if packed is not None:
            return packed
        n *= 2


def attention_spans(documents: "torch.Tensor", branches: "torch.Tensor") -> "Spans":
    """What `attention_mask` allows, as spans (llama.Span): one per unit (and one per run of
    padding), so attention costs each unit's own length squared rather than the row's."""
    import torch

    from benchmarks.models.llama import Span

    spans = []
    for unit_ids, branch_ids in zip(documents.tolist(), branches.tolist()):
        row, start, t = [], 0, len(unit_ids)
        while start < t:
            end = start
            while end < t and unit_ids[end] == unit_ids[start]:
                end += 1
            shared_end = start
            while shared_end < end and branch_ids[shared_end] == 0:
                shared_end += 1
            mask = None
            if shared_end < end:
                keys = torch.tensor(branch_ids[start:end])
                queries = keys[shared_end - start:, None]
                causal = torch.arange(start, end)[None, :] <= torch.arange(shared_end, end)[:, None]
                mask = ((keys[None, :] == 0) | (keys[None, :] == queries)) & causal
            row.append(Span(start, shared_end, end, mask))
            start = end
        spans.append(tuple(row))
    return tuple(spans)


def attention_mask(documents: "torch.Tensor", branches: "torch.Tensor | None" = None) -> "torch.Tensor":
    """[b, 1, t, t] boolean: causal, within the same unit, and from a branch only to the unit's
    shared part and to the same branch (the reference for attention_spans)."""
    import torch

    t = documents.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = (documents[:, :, None] == documents[:, None, :]) & causal
    if branches is not None:
        mask &= (branches[:, None, :] == 0) | (branches[:, :, None] == branches[:, None, :])
    return mask[:, None]


# --- quality gate ----------------------------------------------------------------------------

GATE_MAX_TOKENS = {"arith": 128, "recall": 8, "text": 64}  # as benchmarks.evaluate


def greedy_texts(model, tokenizer, prompts: Sequence[str], max_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts` by our own Llama (float32, full recompute per token, left
    padding masked out): the gate's check, with no engine and no randomness."""
    import torch

    from benchmarks.models.tokenizer import BOS, EOS

    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    texts: list[str] = []
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                rows = [[bos, *_encode(tokenizer, p)] for p in prompts[start:start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
                valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
                out: list[list[int]] = [[] for _ in rows]
                done = torch.zeros(len(rows), dtype=torch.bool)
                for _ in range(max_tokens):
                    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
                    t = ids.shape[1]
                    mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
                    logits = model(ids, positions, mask)[:, -1]
                    nxt = logits.argmax(-1)
                    for i, token in enumerate(nxt.tolist()):
                        if not done[i]:
                            if token == eos:
                                done[i] = True
                            else:
                                out[i].append(token)
                    if bool(done.all()):
                        break
                    ids = torch.cat([ids, nxt[:, None]], dim=1)
                    valid = torch.cat([valid, torch.ones(len(rows), 1, dtype=torch.bool)], dim=1)
                texts += [tokenizer.decode(o, skip_special_tokens=True) for o in out]
    finally:
        model.train()
    return texts


def gate_accuracy(model, tokenizer, gate: Gate) -> dict[str, float]:
    """Greedy held-out accuracy per gated task on the gate's validation seed."""
    from benchmarks.tasks.mixture import eval_examples, task_module

    accuracy = {}
    for task, _ in gate.accuracy:
        examples = eval_examples(task, gate.seed, gate.n)
        texts = greedy_texts(model, tokenizer, [e.prompt for e in examples], GATE_MAX_TOKENS[task],
                             batch_size=8 if task == "recall" else 32)
        accuracy[task] = sum(task_module(task).is_correct(e, t) for e, t in zip(examples, texts)) / len(examples)
    return accuracy


def gate_passed(gate: Gate, accuracy: dict[str, float]) -> bool:
    return all(accuracy[task] >= bar for task, bar in gate.accuracy)


# --- training --------------------------------------------------------------------------------

def learning_rate(config: TrainingConfig, step: int, since_growth: int | None = None,
                  phase: Phase | None = None, phase_step: int = 0) -> float:
    """Linear warmup, cosine decay to min_lr_ratio over the scheduled steps (`step` counts only
    those); a phase with its own lr holds it after a warmup of its own. After a depth growth, a
    short re-warmup (the new blocks' optimizer state starts empty)."""
    if phase is not None and phase.lr is not None:
        rate = phase.lr * min(1.0, (phase_step + 1) / config.warmup_steps)
    elif step < config.warmup_steps:
        rate = config.lr * (step + 1) / config.warmup_steps
    else:
        progress = (step - config.warmup_steps) / max(1, config.scheduled_steps - config.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        rate = config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)
    rewarm = max(1, config.warmup_steps // 2)
    if since_growth is not None and since_growth < rewarm:
        rate *= (since_growth + 1) / rewarm
    return rate


def deterministic_setup(config: TrainingConfig) -> None:
    import torch

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    torch.set_num_threads(config.threads)
    torch.use_deterministic_algorithms(True)


def build_model(config: TrainingConfig):
    from benchmarks.models.llama import Llama

    shape = dataclasses.replace(config.shape, num_layers=config.depth(config.phases[0]))
    return Llama(shape, config.initializer_range)


def optimizer_for(model, config: TrainingConfig):
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed_tokens" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, foreach=True)


def loss_on(model, rows: PackedRows, config: TrainingConfig) -> tuple["torch.Tensor", dict[str, float]]:
    """Weighted mean next-token cross-entropy (logits only where the weight is positive), and
    each task's mean loss in the batch (for the logs)."""
    import torch
    import torch.nn.functional as F

    mask = attention_spans(rows.documents, rows.branches)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast)
    with autocast:
        hidden = model.hidden_states(rows.inputs, rows.positions, mask)
        selected = rows.weights > 0
        logits = model.lm_head(hidden[selected])
    losses = F.cross_entropy(logits.float(), rows.targets[selected], reduction="none")
    weights = rows.weights[selected]
    tasks = rows.tasks[selected]
    per_task = {}
    with torch.no_grad():
        for i, task in enumerate(TASK_ORDER):
            here = tasks == i
            if here.any():
                per_task[task] = ((losses[here] * weights[here]).sum() / weights[here].sum()).item()
    return (losses * weights).sum() / weights.sum(), per_task


class Progress:
    """A tqdm bar on a terminal, a log line every ~5% otherwise."""

    def __init__(self, total: int, name: str, log: Callable[[str], None]) -> None:
        self.total, self.name, self.log = total, name, log
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"train {name}", unit="step", file=sys.stderr, dynamic_ncols=True)
        self.every = max(1, total // 20)
        self.start = time.perf_counter()

    def update(self, step: int, losses: dict[str, float], tokens_per_s: float, phase: int) -> None:
        shown = " ".join(f"{task} {value:.3f}" for task, value in losses.items())
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {shown}, {tokens_per_s:.0f} tok/s, phase {phase}", refresh=False)
            self.bar.update(1)
        elif (step + 1) % self.every == 0 or step + 1 == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / (step + 1) * (self.total - step - 1)
            self.log(f"{self.name}: step {step + 1}/{self.total} phase {phase} loss {shown} "
                     f"{tokens_per_s:.0f} tok/s elapsed {elapsed:.0f}s ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_model(config: TrainingConfig, tokenizer, log: Callable[[str], None] | None = None):
    """Train `config`'s model in this process; returns (model, history, gate rounds)."""
    import torch

    from benchmarks.models.llama import expand_depth

    log = log or _stderr
    deterministic_setup(config)
    model = build_model(config)
    optimizer = optimizer_for(model, config)
    history: list[dict] = []
    gate_rounds: list[dict] = []
    progress = Progress(config.steps, config.name, log)
    state = {"step": 0, "scheduled": 0, "grown_at": None, "tokens": 0}
    smoothed: dict[str, float] = {}
    start = time.perf_counter()

    def run_phase(index: int, phase: Phase, data_index: int, shown: bool) -> None:
        data = phase_rows(config, data_index, phase, tokenizer)
        for phase_step in range(phase.steps):
            step = state["step"]
            since_growth = None if state["grown_at"] is None else step - state["grown_at"]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, state["scheduled"], since_growth, phase, phase_step)
            rows = slice(phase_step * phase.rows, (phase_step + 1) * phase.rows)
            batch = PackedRows(*(getattr(data, f.name)[rows] for f in dataclasses.fields(PackedRows)))
            loss, per_task = loss_on(model, batch, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            value = loss.item()
            for task, task_loss in {"all": value, **per_task}.items():
                smoothed[task] = 0.9 * smoothed.get(task, task_loss) + 0.1 * task_loss
            state["tokens"] += phase.rows * phase.seq_len
            elapsed = time.perf_counter() - start
            if shown:
                progress.update(step, smoothed, state["tokens"] / elapsed, index)
            history.append({"step": step, "phase": index, "loss": round(value, 5), "seconds": round(elapsed, 2),
                            **{task: round(v, 4) for task, v in per_task.items()}})
            state["step"] += 1
            state["scheduled"] += phase.lr is None

    try:
        for index, phase in enumerate(config.phases):
            if config.depth(phase) > model.shape.num_layers:
                model = expand_depth(model, config.depth(phase))
                optimizer = optimizer_for(model, config)
                state["grown_at"] = state["step"]
            run_phase(index, phase, index, shown=True)
            gate = config.gate
            if gate is not None and index == gate.after_phase:
                for round_ in range(gate.max_extensions + 1):
                    accuracy = gate_accuracy(model, tokenizer, gate)
                    passed = gate_passed(gate, accuracy)
                    gate_rounds.append({"round": round_, "step": state["step"], "accuracy": accuracy, "passed": passed})
                    log(f"{config.name}: quality gate after phase {index}, round {round_}: held-out "
                        f"{accuracy} (bars {dict(gate.accuracy)}): {'passed' if passed else 'below'}")
                    if passed:
                        break
                    if round_ == gate.max_extensions:
                        log(f"{config.name}: quality gate not reached after {gate.max_extensions} extensions; "
                            "going on with the recipe (the figures will say how far off it is)")
                        break
                    # Data of extension rounds: phase indices past the recipe's, one per round.
                    run_phase(index, gate.extension, len(config.phases) + round_, shown=False)
    finally:
        progress.close()
    return model, history, gate_rounds


def train(config: TrainingConfig, tokenizer, out_dir: Path, *, key: str = "", log: Callable[[str], None] | None = None) -> None:
    """Train and write a Hugging Face Llama folder (weights, tokenizer, training.json) to out_dir."""
    import torch

    from benchmarks.models.llama import save_hf
    from benchmarks.models.tokenizer import BOS, EOS, PAD, save_tokenizer

    start = time.perf_counter()
    model, history, gate_rounds = train_model(config, tokenizer, log)
    seconds = time.perf_counter() - start
    ids = {name: tokenizer.token_to_id(tok) for name, tok in (("bos_id", BOS), ("eos_id", EOS), ("pad_id", PAD))}
    save_hf(model, out_dir, **ids)
    save_tokenizer(tokenizer, out_dir, config.shape.max_position_embeddings)
    final = sum(h["loss"] for h in history[-20:]) / len(history[-20:])
    record = {
        "name": config.name, "key": key, "config": config.to_json(), "trainer_version": TRAINER_VERSION,
        "parameters": config.shape.parameter_count(), "seconds": round(seconds, 1), "final_loss": round(final, 4),
        "torch": torch.__version__, "gate": gate_rounds, "history": history,
    }
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")  # written last: marks completion


# --- quick check -----------------------------------------------------------------------------

def quick_check(path: Path, tasks: Sequence[str], n: int, max_tokens: dict[str, int] | None = None) -> dict[str, float]:
    """Greedy held-out accuracy with transformers' generate (cheap; vLLM's figures come from
    benchmarks.evaluate)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from benchmarks.tasks.mixture import eval_examples, task_module

    limits = {"arith": 128, "recall": 8, "text": 64} | (max_tokens or {})
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    accuracy = {}
    for task in tasks:
        examples, module = eval_examples(task, n=n), task_module(task)
        correct = 0
        batch_size = 8 if task == "recall" else 32
        for i in range(0, n, batch_size):
            chunk = examples[i:i + batch_size]
            encoded = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**encoded, max_new_tokens=limits[task], do_sample=False,
                                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            texts = tokenizer.batch_decode(out[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            correct += sum(module.is_correct(e, t) for e, t in zip(chunk, texts))
        accuracy[task] = correct / n
    return accuracy


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def evaluate_pair(paths: dict[str, Path], n: int, seed: int) -> dict[str, dict[str, float]]:
    """Held-out accuracy of each trained model through vLLM's CPU engine (greedy, bfloat16, as
    the shipped weights are stored): role -> task -> accuracy."""
    import datetime

    from benchmarks.evaluate import DEFAULT_BATCH1, Model, format_table, run_evaluation, write_report

    models = [Model(role, str(path)) for role, path in paths.items()]
    report = run_evaluation(models, ["arith", "recall", "text"], n=n, seed=seed, dtype="bfloat16",
                            batch1=DEFAULT_BATCH1)
    out = Path("results") / "train-verify" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_report(report, out)
    print(format_table(report.results), file=sys.stderr, flush=True)
    _stderr(f"evaluation written to {out}/")
    accuracy: dict[str, dict[str, float]] = {role: {} for role in paths}
    for row in report.results:
        accuracy[row.model][row.task] = row.accuracy
    return accuracy


def verify_against_shipped(paths: dict[str, Path], ship: bool, command: str = "python -m benchmarks.models.train --verify --ship") -> bool:
    """Evaluate the trained pair like the manifests were, say whether it reproduces them, and
    with `ship` write it into models/ with its own figures."""
    from benchmarks.models import shipped
    from benchmarks.tasks.mixture import EVAL_SEED

    n = 100
    accuracy = evaluate_pair(paths, n, EVAL_SEED)
    problems = []
    for role, path in paths.items():
        if ship and not (shipped.folder(role) / shipped.MANIFEST).is_file():
            continue  # the first pair to ship: nothing to compare with
        entry = shipped.manifest(role)
        key = json.loads((path / "training.json").read_text())["key"]
        same = "the same recipe" if key == entry.recipe_key else f"recipe {key}, shipped {entry.recipe_key}"
        found = shipped.differences(role, accuracy[role])
        problems += found
        figures = ", ".join(f"{t} {a:.2f} (shipped {entry.accuracy[t]:.2f})" for t, a in sorted(accuracy[role].items()))
        _stderr(f"{role}: {figures}; {same}; {'reproduces' if not found else 'DOES NOT reproduce'} the shipped "
                f"figures within {entry.tolerance:.2f}")
    if ship:
        evaluation = {"command": command, "n": n, "seed": EVAL_SEED,
                      "dtype": "bfloat16", "vllm": _vllm_version()}
        for role, path in paths.items():
            _stderr(f"{role}: shipped to {shipped.ship(role, path, accuracy[role], evaluation)}")
    return not problems


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*CONFIGS, "both", "all"], default="both",
                        help="both: the speculative pair (draft and target); all: the pair and EAD's small model")
    parser.add_argument("--print-path", action="store_true", help="print only the model folder (one model)")
    parser.add_argument("--force", action="store_true", help="train even if cached")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="after training, greedy accuracy on N held-out arith and recall examples (transformers)")
    parser.add_argument("--verify", action="store_true",
                        help="after training, evaluate the models with vLLM (n=100) and compare with the shipped "
                             "manifests (models/*/manifest.json); exit 1 when they do not reproduce")
    parser.add_argument("--ship", action="store_true",
                        help="with --verify: write the trained models and their figures into models/")
    args = parser.parse_args(argv)
    names = {"both": list(PAIR), "all": list(CONFIGS)}.get(args.model, [args.model])
    if args.print_path and len(names) != 1:
        parser.error(f"--print-path needs one model: --model {' or '.join(CONFIGS)}")
    paths = {}
    for name in names:
        start = time.perf_counter()
        path = ensure_trained(CONFIGS[name], force=args.force)
        paths[name] = path
        record = json.loads((path / "training.json").read_text())
        _stderr(f"{name}: {path} (trained in {record['seconds']:.0f}s, final loss {record['final_loss']:.3f}; "
                f"this call {time.perf_counter() - start:.0f}s)")
        if args.check:
            _stderr(f"{name}: held-out accuracy (transformers, greedy, n={args.check}): "
                    f"{quick_check(path, ['arith', 'recall'], args.check)}")
        print(path if args.print_path else f"{name}: {path}", flush=True)
    if args.verify or args.ship:
        command = " ".join(["python -m benchmarks.models.train", *(argv if argv is not None else sys.argv[1:])])
        if not verify_against_shipped(paths, ship=args.ship, command=command) and not args.ship:
            sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
