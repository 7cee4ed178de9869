"""A generator of small verifiable tasks (a three-digit number plus a digit) for the post-training example and tests.

    python -m posttrain.arithmetic --output DIR [--train 3000 --heldout 500 --seed 0]

writes ``DIR/sft.jsonl`` (question -> answer conversations), ``DIR/prefs.jsonl`` (the correct answer chosen over a
near miss), ``DIR/heldout.jsonl`` (``{"prompt", "answer"}`` items never in the training files) and ``DIR/text.txt``
(plain text to train a tokenizer and pretrain on). The answer is checked by exact match (``is_correct``).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def question(a: int, b: int) -> str:
    return f"{a}+{b}="


def near_miss(rng: random.Random, a: int, b: int) -> int:
    """A typical wrong answer: the carry forgotten or misplaced, the first number copied, or off by one."""
    answer, wrong = a + b, a + b
    while wrong == answer or wrong < 0:
        wrong = rng.choice([a, answer - 1, answer + 1, answer - 10, answer + 10, a + (b % 10) - ((a % 10 + b) // 10) * 10])
    return wrong


def is_correct(prompt: str, completion: str) -> bool:
    """Exact match of the completion (stripped) with the sum the prompt asks for."""
    a, b = prompt.rstrip("=").split("+")
    return completion.strip() == str(int(a) + int(b))


def make(num_train: int, num_heldout: int, seed: int = 0, max_a: int = 999, max_b: int = 9) -> dict:
    """{"sft": [...], "prefs": [...], "heldout": [...], "text": str}: a in [0, max_a] plus b in [1, max_b] (a toy
    model learns the carry in minutes), disjoint (a, b) pairs for train and held-out."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_a + 1) for b in range(1, max_b + 1)]
    rng.shuffle(pairs)
    if num_train + num_heldout > len(pairs):
        raise ValueError(f"{num_train} + {num_heldout} items: only {len(pairs)} distinct ones; raise max_a")
    heldout, train = pairs[:num_heldout], pairs[num_heldout:num_heldout + num_train]
    sft = [{"messages": [{"role": "user", "content": question(a, b)},
                         {"role": "assistant", "content": str(a + b)}]} for a, b in train]
    prefs = [{"prompt": question(a, b), "chosen": str(a + b), "rejected": str(near_miss(rng, a, b))}
             for a, b in train]
    text = "\n".join(f"{a} plus {b} is {a + b}. {question(a, b)}{a + b}" for a, b in train)
    return {"sft": sft, "prefs": prefs, "text": text,
            "heldout": [{"prompt": question(a, b), "answer": str(a + b),
                         "rejected": str(near_miss(rng, a, b))} for a, b in heldout]}


def write(out: str | Path, num_train: int, num_heldout: int, seed: int = 0) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make(num_train, num_heldout, seed)
    for name in ("sft", "prefs", "heldout"):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[name]))
    (out / "text.txt").write_text(data["text"] + "\n")
    return {name: str(out / f"{name}.jsonl") for name in ("sft", "prefs", "heldout")} | {"text": str(out / "text.txt")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m posttrain.arithmetic", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(json.dumps(write(args.output, args.train, args.heldout, args.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
