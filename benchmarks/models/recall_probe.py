"""How fast a small Llama learns associative recall (the lookup behind the `recall` task).

    python -m benchmarks.models.recall_probe                       # 2 layers, h128, lr 1e-3, 8 pairs
    python -m benchmarks.models.recall_probe --lr 3e-3             # stays on the plateau
    python -m benchmarks.models.recall_probe --queries 1           # so does one query per sequence
    python -m benchmarks.models.recall_probe --kv-heads 2 --untied --layers 4   # the pair's layout
    python -m benchmarks.models.recall_probe --then-steps 800       # then 16-64 pairs: longer contexts

A research probe for issue #6, not part of the trained pair. Whether and when the plateau ends
here is mostly luck at this scale: the default run has its phase change at step ~1600 with
seed 0 and none by step 1700 with seed 1. The trained pair forms its induction head from copy
documents instead, in about 200 steps (`train.copy_units`). Sequences are token ids drawn
directly, with no tokenizer and no task text (MQAR layout, as in the Zoology paper):

    BOS k1 v1 k2 v2 ... kN vN   kσ1 vσ1 kσ2 vσ2 ...     (loss on every repeated value vσj)

Keys are distinct within a sequence; values are drawn with replacement. Predicting a repeated
value needs an induction head (find the earlier copy of the current key, copy the token after
it); until one forms, the best a model does is a value from the context ("bag of values",
accuracy about 1/N). The probe prints training accuracy every 100 steps, then accuracy on
fresh sequences with more pairs (does a lookup learnt at N pairs carry to longer contexts?).
Figures and what they mean: docs/models_and_tasks.md ("Session 5").
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from collections.abc import Sequence

BOS = 1
KEY_IDS = range(100, 420)  # 320 keys, like the recall task's key pool
VALUE_IDS = range(500, 554)  # 54 values, like the story words
IGNORE = -100
# Ids used stop at 553; 1280 is the vocabulary the documented figures were measured with.
VOCAB_SIZE = 1280


@dataclasses.dataclass(frozen=True)
class ProbeBatch:
    inputs: list[list[int]]
    targets: list[list[int]]  # IGNORE except at the positions that predict a repeated value


def make_batch(rng: random.Random, sequences: int, pairs: int, queries: int) -> ProbeBatch:
    """`sequences` MQAR sequences of `pairs` pairs, then `queries` of them repeated in a random
    order; the target at each repeated key is its value."""
    if not 1 <= queries <= pairs <= len(KEY_IDS):
        raise ValueError(f"need 1 <= queries <= pairs <= {len(KEY_IDS)}, got queries={queries}, pairs={pairs}")
    inputs, targets = [], []
    for _ in range(sequences):
        keys = rng.sample(KEY_IDS, pairs)
        values = [rng.choice(VALUE_IDS) for _ in keys]
        order = rng.sample(range(pairs), queries)
        sequence = [BOS] + [t for k, v in zip(keys, values) for t in (k, v)]
        sequence += [t for i in order for t in (keys[i], values[i])]
        target = [IGNORE] * len(sequence)
        for j, i in enumerate(order):
            target[2 * pairs + 1 + 2 * j] = values[i]  # the position of the repeated key
        inputs.append(sequence)
        targets.append(target)
    return ProbeBatch(inputs, targets)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models.recall_probe",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--untied", action="store_true", help="separate lm_head (the trained pair's layout)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--sequences", type=int, default=64, help="sequences per step")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--queries", type=int, default=8, help="repeated pairs per sequence (loss positions)")
    parser.add_argument("--then-steps", type=int, default=0,
                        help="after --steps, this many steps with --then-pairs (a length curriculum)")
    parser.add_argument("--then-pairs", default="16,32,64", help="pair counts drawn per step in the --then-steps stage")
    parser.add_argument("--then-sequences", type=int, default=16)
    parser.add_argument("--eval-pairs", default="8,32,128,300")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from benchmarks.models.llama import Llama, LlamaShape

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    shape = LlamaShape(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.hidden // 32, num_kv_heads=args.kv_heads,
                       intermediate_size=3 * args.hidden, tie_word_embeddings=not args.untied)
    model = Llama(shape, 0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    rng = random.Random(args.seed)

    def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
        scored = targets != IGNORE
        return (logits.argmax(-1) == targets)[scored].float().mean().item()

    start = time.perf_counter()
    then_pairs = [int(p) for p in args.then_pairs.split(",")]
    for step in range(args.steps + args.then_steps):
        if step < args.steps:
            batch = make_batch(rng, args.sequences, args.pairs, args.queries)
        else:
            pairs = rng.choice(then_pairs)
            batch = make_batch(rng, args.then_sequences, pairs, pairs)
        inputs, targets = torch.tensor(batch.inputs), torch.tensor(batch.targets)
        logits = model(inputs)
        loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step in (args.steps - 1, args.steps + args.then_steps - 1):
            print(f"step {step} loss {loss.item():.3f} accuracy {accuracy(logits, targets):.3f} "
                  f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    model.eval()
    held_out = random.Random(args.seed + 1)
    for pairs in (int(p) for p in args.eval_pairs.split(",")):
        batch = make_batch(held_out, 16, pairs, pairs)
        with torch.no_grad():
            logits = model(torch.tensor(batch.inputs))
        print(f"pairs {pairs} ({4 * pairs + 1} tokens): accuracy {accuracy(logits, torch.tensor(batch.targets)):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
