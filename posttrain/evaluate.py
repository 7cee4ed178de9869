"""Held-out numbers for the post-training example (``launch_scripts/posttrain_quickstart.sh``).

    python -m posttrain.evaluate --heldout heldout.jsonl --base RUN --sft RUN [--rm RUN] [--dpo RUN] [--json OUT]

Held-out items are ``{"prompt", "answer", "rejected"}`` (``posttrain.arithmetic``). Reported:

* ``exact_match``: greedy completion (``pretrain.generate.generate``, stop at the end-of-turn token) equals the
  answer, for the base and the SFT model (and DPO);
* ``rm_accuracy``: the reward model scores prompt + answer above prompt + rejected;
* ``preference_accuracy``: the policy's log-likelihood ratio against the SFT model (DPO's implicit reward) is
  higher for the answer than for the rejected one; for the SFT model itself the plain log-likelihood is compared;
* ``win_rate``: the reward model prefers the DPO model's greedy completion to the SFT model's (ties count half).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from posttrain.chat import ChatTokenizer, render
from posttrain.data import IGNORE_INDEX, response_sequence
from posttrain.objectives import per_token_nll


def load_policy(path):
    from pretrain.checkpoint import load_model_from_checkpoint

    model, _, tokenizer = load_model_from_checkpoint(path)
    return model.eval(), tokenizer


def prompt_ids(tok: ChatTokenizer, prompt: str) -> list[int]:
    return render(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]


@torch.no_grad()
def completions(model, tok: ChatTokenizer, items: list, max_new_tokens: int = 6, batch_size: int = 100) -> list[str]:
    from pretrain.generate import generate

    out = []
    for first in range(0, len(items), batch_size):
        prompts = [prompt_ids(tok, it["prompt"]) for it in items[first:first + batch_size]]
        for new in generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=[tok.end_of_turn_id]):
            out.append(tok.decode([t for t in new if t != tok.end_of_turn_id]))
    return out


def exact_match(model, tok: ChatTokenizer, items: list) -> float:
    from posttrain.arithmetic import is_correct

    answers = completions(model, tok, items)
    return sum(is_correct(it["prompt"], a) for it, a in zip(items, answers)) / len(items)


@torch.no_grad()
def response_logps(model, tok: ChatTokenizer, items: list, key: str) -> torch.Tensor:
    """Summed log-prob of each item's response ``item[key]`` after its prompt (N,)."""
    out = []
    for it in items:
        ids, labels = response_sequence(tok, [{"role": "user", "content": it["prompt"]}],
                                        [{"role": "assistant", "content": it[key]}])
        ids, labels = torch.from_numpy(ids)[None], torch.from_numpy(labels)[None]
        nll = per_token_nll(model(ids), labels)
        out.append(-(nll * (labels != IGNORE_INDEX)).sum())
    return torch.stack(out)


def preference_accuracy(model, tok: ChatTokenizer, items: list, reference=None) -> float:
    """Fraction of items whose answer beats the rejected response under log pi (minus log pi_ref when given)."""
    margin = response_logps(model, tok, items, "answer") - response_logps(model, tok, items, "rejected")
    if reference is not None:
        margin -= response_logps(reference, tok, items, "answer") - response_logps(reference, tok, items, "rejected")
    return float((margin > 0).float().mean())


def rm_accuracy(rm, items: list) -> float:
    chosen = rm.score([conversation(it["prompt"], it["answer"]) for it in items])
    rejected = rm.score([conversation(it["prompt"], it["rejected"]) for it in items])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(items)


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def win_rate(rm, items: list, answers_a: list[str], answers_b: list[str]) -> float:
    """How often the reward model prefers answer a to answer b (ties count half)."""
    a = rm.score([conversation(it["prompt"], x) for it, x in zip(items, answers_a)])
    b = rm.score([conversation(it["prompt"], x) for it, x in zip(items, answers_b)])
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(items)


def evaluate(heldout: str, base: str, sft: str, rm: str | None = None, dpo: str | None = None) -> dict:
    from posttrain.reward import RewardModel

    items = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    sft_model, tokenizer = load_policy(sft)
    tok = ChatTokenizer(tokenizer)
    base_model, _ = load_policy(base)
    res = {"items": len(items), "exact_match": {"base": exact_match(base_model, tok, items),
                                                 "sft": exact_match(sft_model, tok, items)},
           "preference_accuracy": {"sft": preference_accuracy(sft_model, tok, items)}}
    if dpo:
        dpo_model, _ = load_policy(dpo)
        res["exact_match"]["dpo"] = exact_match(dpo_model, tok, items)
        res["preference_accuracy"]["dpo"] = preference_accuracy(dpo_model, tok, items, reference=sft_model)
        res["preference_accuracy"]["dpo_loglik"] = preference_accuracy(dpo_model, tok, items)
    if rm:
        reward = RewardModel.load(rm)
        res["rm_accuracy"] = rm_accuracy(reward, items)
        if dpo:
            res["win_rate_dpo_vs_sft"] = win_rate(reward, items, completions(dpo_model, tok, items),
                                                  completions(sft_model, tok, items))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m posttrain.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--heldout", required=True)
    p.add_argument("--base", required=True, help="the pretrained run (before SFT)")
    p.add_argument("--sft", required=True)
    p.add_argument("--rm")
    p.add_argument("--dpo")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    res = evaluate(args.heldout, args.base, args.sft, args.rm, args.dpo)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
