"""Held-out numbers for the post-training example (``launch_scripts/posttrain_quickstart.sh``).

    python -m posttrain.evaluate --heldout heldout.jsonl --base RUN --sft RUN [--rm RUN] [--dpo RUN] [--json OUT]
    python -m posttrain.evaluate --heldout heldout.jsonl --runs NAME=RUN ... [--rewards SPEC ...]
        [--max-new-tokens N] [--json OUT]

Held-out items are ``{"prompt", "answer", "rejected"}`` (``posttrain.arithmetic``). Reported:

* ``exact_match``: greedy completion (``pretrain.generate.generate``, stop at the end-of-turn token) equals the
  answer, for the base and the SFT model (and DPO);
* ``rm_accuracy``: the reward model scores prompt + answer above prompt + rejected;
* ``preference_accuracy``: the policy's log-likelihood ratio against the SFT model (DPO's implicit reward) is
  higher for the answer than for the rejected one; for the SFT model itself the plain log-likelihood is compared;
  ``dpo_loglik``: the DPO model's plain log-likelihood compared (the same measure as the SFT model's);
* ``win_rate``: the reward model prefers the DPO model's greedy completion to the SFT model's (ties count half).

With ``--runs`` (the RL stages, ``launch_scripts/r1_quickstart.sh``): each run's greedy completions (up to
``--max-new-tokens``, stop at the end of turn) scored by rule rewards (``--rewards``, the specs of
``posttrain.rejection_sample``; default ``accuracy``, which needs the items' ``"answer"``): ``{"items": N,
"heldout": {NAME: {"reward_mean": Σ weight · value averaged, "<reward name>": its mean value, ...}}}``. Items are
RL prompt records (``{"prompt": str | messages, ...}``, the record is the rewards' ``sample``). ``--curves NAME=RUN
...`` adds each RL run's reward curve, ``{"reward_curve": {NAME: [[step, rl/reward_mean], ...]}}``, read from its
``metrics.jsonl``.
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
def completions(model, tok: ChatTokenizer, items: list, max_new_tokens: int = 6, batch_size: int = 500) -> list[str]:
    from pretrain.generate import generate

    out = []
    for first in range(0, len(items), batch_size):
        prompts = [prompt_ids(tok, it["prompt"]) for it in items[first:first + batch_size]]
        for new in generate(model, prompts, max_new_tokens, temperature=0.0, stop_ids=[tok.end_of_turn_id]):
            out.append(tok.decode([t for t in new if t != tok.end_of_turn_id]))
    return out


def exact_match(model, tok: ChatTokenizer, items: list, answers: list[str] | None = None) -> float:
    """Fraction of items whose greedy completion (or the given ``answers``) is correct."""
    from posttrain.arithmetic import is_correct

    answers = completions(model, tok, items) if answers is None else answers
    return sum(is_correct(it["prompt"], a) for it, a in zip(items, answers)) / len(items)


@torch.no_grad()
def response_logps(model, tok: ChatTokenizer, items: list, key: str, batch_size: int = 250) -> torch.Tensor:
    """Summed log-prob of each item's response ``item[key]`` after its prompt (N,), in right-padded batches."""
    from posttrain.stage import token_logps

    out = []
    for first in range(0, len(items), batch_size):
        seqs = [response_sequence(tok, [{"role": "user", "content": it["prompt"]}],
                                  [{"role": "assistant", "content": it[key]}])
                for it in items[first:first + batch_size]]
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for i, (a, b) in enumerate(seqs):
            ids[i, :len(a)], labels[i, :len(b)] = torch.from_numpy(a), torch.from_numpy(b)
        out.append(token_logps(per_token_nll(model(ids), labels), labels))
    return torch.cat(out)


def preference_margins(model, tok: ChatTokenizer, items: list) -> torch.Tensor:
    """log pi(answer) - log pi(rejected) of each item (N,)."""
    return response_logps(model, tok, items, "answer") - response_logps(model, tok, items, "rejected")


def preference_accuracy(model, tok: ChatTokenizer, items: list, reference=None) -> float:
    """Fraction of items whose answer beats the rejected response under log pi (minus log pi_ref when given)."""
    margin = preference_margins(model, tok, items)
    if reference is not None:
        margin -= preference_margins(reference, tok, items)
    return float((margin > 0).float().mean())


def rm_accuracy(rm, items: list) -> float:
    chosen = rm.score([conversation(it["prompt"], it["answer"]) for it in items], batch_size=250)
    rejected = rm.score([conversation(it["prompt"], it["rejected"]) for it in items], batch_size=250)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(items)


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def win_rate(rm, items: list, answers_a: list[str], answers_b: list[str]) -> float:
    """How often the reward model prefers answer a to answer b (ties count half)."""
    a = rm.score([conversation(it["prompt"], x) for it, x in zip(items, answers_a)], batch_size=250)
    b = rm.score([conversation(it["prompt"], x) for it, x in zip(items, answers_b)], batch_size=250)
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(items)


def evaluate(heldout: str, base: str, sft: str, rm: str | None = None, dpo: str | None = None) -> dict:
    from posttrain.reward import RewardModel

    items = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    sft_model, tokenizer = load_policy(sft)
    tok = ChatTokenizer(tokenizer)
    base_model, _ = load_policy(base)
    answers = {"base": completions(base_model, tok, items), "sft": completions(sft_model, tok, items)}
    margins = {"sft": preference_margins(sft_model, tok, items)}  # each model's completions and margins once
    if dpo:
        dpo_model, _ = load_policy(dpo)
        answers["dpo"], margins["dpo"] = completions(dpo_model, tok, items), preference_margins(dpo_model, tok, items)
    res = {"items": len(items), "exact_match": {k: exact_match(None, tok, items, a) for k, a in answers.items()},
           "preference_accuracy": {"sft": float((margins["sft"] > 0).float().mean())}}
    if dpo:
        res["preference_accuracy"]["dpo"] = float((margins["dpo"] - margins["sft"] > 0).float().mean())
        res["preference_accuracy"]["dpo_loglik"] = float((margins["dpo"] > 0).float().mean())
    if rm:
        reward = RewardModel.load(rm)
        res["rm_accuracy"] = rm_accuracy(reward, items)
        if dpo:
            res["win_rate_dpo_vs_sft"] = win_rate(reward, items, answers["dpo"], answers["sft"])
    return res


def rule_scores(model, tok: ChatTokenizer, items: list, rewards: list, max_new_tokens: int) -> dict:
    """{"reward_mean": mean total, <reward name>: mean value} of greedy completions under loaded rl rewards."""
    from posttrain.rl.rewards import score_batch

    texts = completions(model, tok, items, max_new_tokens)
    totals, per_reward = score_batch(rewards, [it["prompt"] for it in items], texts, items)
    return {"reward_mean": sum(totals) / len(totals)} | {k.removeprefix("rl/reward/"): v for k, v in per_reward.items()}


def evaluate_runs(heldout: str, runs: list[str], reward_specs: list[str] | None = None,
                  max_new_tokens: int = 64) -> dict:
    """``--runs NAME=RUN ...``: held-out rule-reward scores of each run's greedy completions."""
    from posttrain.rejection_sample import parse_reward_specs
    from posttrain.rl.rewards import load_rewards

    rewards = load_rewards(parse_reward_specs(reward_specs))
    named = _named_runs("--runs", runs)
    items = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line.strip()]
    res: dict = {"items": len(items), "max_new_tokens": max_new_tokens, "heldout": {}}
    for name, path in named:
        model, tokenizer = load_policy(path)
        res["heldout"][name] = rule_scores(model, ChatTokenizer(tokenizer), items, rewards, max_new_tokens)
    return res


def _named_runs(flag: str, runs: list[str]) -> list[tuple[str, str]]:
    """["NAME=RUN", ...] -> [(name, run)], a ConfigError naming the flag for a malformed one."""
    from pretrain.config import ConfigError

    named = [run.partition("=") for run in runs]
    bad = [run for run, (name, eq, path) in zip(runs, named) if not (name and eq and path)]
    if bad:
        raise ConfigError(f"{flag} {bad[0]!r}: each run is NAME=RUN_DIR (e.g. grpo=runs/r1/grpo)")
    return [(name, path) for name, _, path in named]


def reward_curves(runs: list[str], key: str = "rl/reward_mean") -> dict:
    """``--curves NAME=RUN ...`` -> {NAME: [[step, value], ...]} from each run's metrics.jsonl."""
    from pretrain.config import ConfigError

    curves = {}
    for name, path in _named_runs("--curves", runs):
        metrics = Path(path) / "metrics.jsonl"
        if not metrics.is_file():
            raise ConfigError(f"--curves {name}={path}: no metrics.jsonl there (a posttrain.grpo run directory?)")
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        curves[name] = [[r["step"], r[key]] for r in records if key in r]
        if not curves[name]:
            raise ConfigError(f"--curves {name}={path}: its metrics.jsonl has no {key!r} (not an RL run?)")
    return curves


def summary(res: dict) -> str:
    """``--runs`` numbers as lines: each run's held-out scores, then each reward curve."""
    lines = [f"{name:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in scores.items())
             for name, scores in res["heldout"].items()]
    lines.insert(0, f"held-out ({res['items']} items, greedy):")
    for name, curve in res.get("reward_curve", {}).items():
        lines.append(f"{name} rl/reward_mean by step: " + " ".join(f"{v:.2f}" for _, v in curve))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import ConfigError

    p = argparse.ArgumentParser(prog="python -m posttrain.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--heldout", required=True)
    p.add_argument("--base", help="the pretrained run (before SFT)")
    p.add_argument("--sft")
    p.add_argument("--rm")
    p.add_argument("--dpo")
    p.add_argument("--runs", nargs="+", metavar="NAME=RUN", help="rule-reward accuracy of each run (RL stages)")
    p.add_argument("--rewards", nargs="+", metavar="SPEC", help="with --runs: FN, FN=WEIGHT or '{fn: FN, weight: W}'"
                                                                 " (default accuracy)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="with --runs: greedy completion budget")
    p.add_argument("--curves", nargs="+", metavar="NAME=RUN", help="with --runs: RL runs whose rl/reward_mean "
                                                                    "curve (metrics.jsonl) joins the numbers")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    try:
        if args.runs:
            res = evaluate_runs(args.heldout, args.runs, args.rewards, args.max_new_tokens)
            if args.curves:
                res["reward_curve"] = reward_curves(args.curves)
        elif args.base and args.sft:
            res = evaluate(args.heldout, args.base, args.sft, args.rm, args.dpo)
        else:
            raise ConfigError("give --runs NAME=RUN ... (rule rewards), or --base RUN --sft RUN (the SFT/RM/DPO "
                              "example)")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"posttrain.evaluate: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=1)
    print(summary(res) if args.runs else text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    from pretrain.engine import exit_process

    exit_process(main())  # under torchrun: process group destroyed, no finalisation abort
