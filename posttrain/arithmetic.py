"""A generator of small verifiable tasks for the post-training examples and tests: ``add`` (a three-digit number plus a
digit), ``copy`` (repeat a 6-digit string) and ``reason`` (``copy`` answered in DeepSeek-R1's format, the digits
read out one by one first: ``repeat 4821`` -> ``<think>4 8 2 1</think><answer>4821</answer>``; a toy model
learns it in minutes of CPU, where the carry of ``add`` stays out of reach).

    python -m posttrain.arithmetic --output DIR [--task add|copy|reason --train 3000 --heldout 500 --seed 0]

writes ``DIR/sft.jsonl`` (question -> response conversations), ``DIR/prefs.jsonl`` (the correct response chosen over a
near miss), ``DIR/rl.jsonl`` (RL prompts ``{"prompt", "answer"}`` of the training items, for ``posttrain.grpo`` and
``posttrain.rejection_sample``), ``DIR/heldout.jsonl`` (``{"prompt", "answer", "rejected"}`` items never in the
training files) and ``DIR/text.txt`` (plain text to train a tokenizer and pretrain on). ``add`` and ``copy`` are
checked by exact match of the whole completion (``is_correct``); ``reason`` by the final answer, as the built-in
``accuracy`` reward of ``posttrain.rl.rewards`` does (the ``<answer>`` tag), and its format by ``format_reward``.
"""
from __future__ import annotations

import argparse
import functools
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


def _add_items(rng: random.Random, n: int, max_a: int = 999, max_b: int = 9) -> list[tuple[str, str, str]]:
    """(prompt, answer, near miss) of a in [0, max_a] plus b in [1, max_b], n distinct ones."""
    pairs = [(a, b) for a in range(max_a + 1) for b in range(1, max_b + 1)]
    rng.shuffle(pairs)
    return [(question(a, b), str(a + b), str(near_miss(rng, a, b))) for a, b in pairs[:n]]


def _copy_items(rng: random.Random, n: int, digits: int = 6) -> list[tuple[str, str, str]]:
    """(prompt, answer, near miss) of "repeat 482130" -> "482130"; the near miss has one digit changed, dropped or
    doubled. Copying is what a toy model learns in a few minutes of CPU."""
    seen, out = set(), []
    while len(out) < n:
        s = "".join(rng.choice("0123456789") for _ in range(digits))
        if s in seen:
            continue
        seen.add(s)
        i = rng.randrange(digits)
        wrong = rng.choice([s[:i] + str((int(s[i]) + rng.randint(1, 9)) % 10) + s[i + 1:], s[:i] + s[i + 1:],
                            s[:i] + s[i] + s[i:]])
        out.append((f"repeat {s}", s, wrong))
    return out


TASKS = {"add": _add_items, "copy": _copy_items, "reason": functools.partial(_copy_items, digits=4)}
"""Task name -> item maker: ``add`` (347+5=), ``copy`` (repeat 482130), ``reason`` (copy's items of 4 digits, R1's
format)."""


def reasoning(prompt: str, answer: str) -> str:
    """The ``reason`` task's response: the prompt's digits read out inside ``<think>``, then ``answer`` (the right
    one, or a near miss) inside ``<answer>``: ``<think>4 8 2 1</think><answer>4821</answer>``."""
    return f"<think>{' '.join(prompt.removeprefix('repeat '))}</think><answer>{answer}</answer>"


def is_correct(prompt: str, completion: str) -> bool:
    """Exact match of the completion (stripped) with the prompt's answer (the sum, or the repeated string); a
    completion with an ``<answer>`` tag (the ``reason`` task) is judged by its final answer only."""
    answer = prompt[len("repeat "):] if prompt.startswith("repeat ") else str(sum(map(int, prompt[:-1].split("+"))))
    if "<answer>" in completion:
        from posttrain.rl.rewards import accuracy
        return accuracy(prompt, completion, {"answer": answer}) == 1.0
    return completion.strip() == answer


def reward(prompt, completion: str, sample: dict) -> float:
    """``is_correct`` as an ``rl.rewards`` / ``--rewards`` function (``posttrain.arithmetic:reward``): 1.0 or 0.0."""
    return float(is_correct(sample["prompt"], completion))


def make(num_train: int, num_heldout: int, seed: int = 0, task: str = "add") -> dict:
    """{"sft": [...], "prefs": [...], "heldout": [...], "text": str}: distinct items, train and held-out disjoint."""
    rng = random.Random(seed)
    items = TASKS[task](rng, num_train + num_heldout)
    if len(items) < num_train + num_heldout:
        raise ValueError(f"{num_train} + {num_heldout} items: task {task} has only {len(items)} distinct ones")
    heldout, train = items[:num_heldout], items[num_heldout:]
    respond = reasoning if task == "reason" else lambda prompt, answer: answer
    sft = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": respond(p, a)}]}
           for p, a, _ in train]
    prefs = [{"prompt": p, "chosen": respond(p, a), "rejected": respond(p, w)} for p, a, w in train]
    text = "\n".join(f"{p} gives {respond(p, a)}. {p}: {respond(p, a)}" for p, a, _ in train)
    return {"sft": sft, "prefs": prefs, "text": text, "rl": [{"prompt": p, "answer": a} for p, a, _ in train],
            "heldout": [{"prompt": p, "answer": a, "rejected": respond(p, w)} for p, a, w in heldout]}


def write(out: str | Path, num_train: int, num_heldout: int, seed: int = 0, task: str = "add") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make(num_train, num_heldout, seed, task)
    names = ("sft", "prefs", "rl", "heldout")
    for name in names:
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[name]))
    (out / "text.txt").write_text(data["text"] + "\n")
    return {name: str(out / f"{name}.jsonl") for name in names} | {"text": str(out / "text.txt")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m posttrain.arithmetic", description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--heldout", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=sorted(TASKS), default="add")
    args = p.parse_args(argv)
    print(json.dumps(write(args.output, args.train, args.heldout, args.seed, args.task)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
