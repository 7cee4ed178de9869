"""Rejection sampling: K samples per prompt -> rewards -> SFT jsonl (DeepSeek-R1 §2.3.3: sample from the RL
checkpoint, keep the correct ones, fine-tune on them).

    python -m posttrain.rejection_sample --checkpoint RUN|STEP|HF --prompts FILE.jsonl --output SFT.jsonl
        [--samples K] [--temperature T] [--top-p P] [--max-new-tokens N] [--seed S] [--rewards SPEC ...]
        [--keep best|threshold] [--threshold X] [--batch-size B]

Prompts are RL prompts (CONTRACT.md): ``{"prompt": str | messages, ...}``; the record reaches each reward function
as ``sample`` (e.g. its ``"answer"`` for the built-in ``accuracy``). Each prompt is rendered with the chat template
(``posttrain.chat.render``, generation prompt appended) and sampled K times (``pretrain.generate.generate``, stop at
the end-of-turn token). Under ``torchrun`` the checkpoint is loaded in its own tp/ep layout
(``pretrain.generate.load_for_generation``), the prompts are split over the data-parallel ranks and everything is
gathered and scored on rank 0.

Rewards: ``--rewards`` takes the entries of ``rl.rewards`` (``posttrain.rl.rewards.load_rewards``), each either
``FN`` or ``FN=WEIGHT`` (FN a built-in name: accuracy, format, language_consistency, or ``module:function``), or a
YAML mapping ``{fn: FN, weight: W, name: N}``; default ``accuracy``. The score is Σ weight · value.

Kept, per prompt, among its complete samples (a sample that reaches ``--max-new-tokens`` without ending its turn is
dropped: trained on, it would teach the model not to stop): ``--keep best`` the highest score (ties: the first
sample), ``--keep threshold`` every distinct completion scoring at least ``--threshold`` (with ``best``, a given
threshold also applies to the best). Identical (prompt, completion) pairs are written once. Each kept sample is a
line ``{"messages": [...prompt messages, {"role": "assistant", "content": completion}]}`` that ``posttrain.sft``
reads; ``--keep pairs`` writes ``{"prompt": messages, "chosen": best, "rejected": worst}`` per prompt whose
complete samples differ in score (on-policy preference pairs for ``posttrain.rm`` / ``posttrain.dpo``). A summary
line (prompts, samples, kept, mean reward) and the dropped prompts by reason go to stdout.

Sampling is reproducible with ``--seed`` for a given data-parallel size and ``--batch-size`` (generate call c of
data-parallel rank d is seeded with seed + c x dp_size + d).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

DROP_REASONS = ("all_truncated", "below_threshold", "no_contrast")
"""Why a prompt contributes no sample: every sample hit --max-new-tokens; no complete sample reached --threshold;
(``--keep pairs``) its complete samples all scored the same."""


def parse_reward_specs(specs: list[str] | None) -> list[dict]:
    """--rewards SPEC ... -> `rl.rewards` entries: "FN", "FN=WEIGHT" or a YAML mapping "{fn: FN, weight: W}"."""
    entries = []
    for spec in specs or ["accuracy"]:
        if spec.lstrip().startswith("{"):
            try:
                entries.append(yaml.safe_load(spec))
            except yaml.YAMLError:
                entries.append(spec)  # load_rewards names the entry and the expected form
            continue
        fn, _, weight = spec.partition("=")
        entry: dict = {"fn": fn.strip()}
        if weight:
            try:
                entry["weight"] = float(weight)
            except ValueError:
                entry["weight"] = weight  # load_rewards: "rl.rewards[i].weight must be a finite number"
        entries.append(entry)
    return entries


def parse_prompt(obj: dict) -> list[tuple[list[dict], dict]]:
    """An RL prompt record -> [(prompt messages, the record as the rewards' sample)] (posttrain.data's skip
    reasons: missing_key, bad_message)."""
    from posttrain.data import Skipped, _messages

    if "prompt" not in obj:
        raise Skipped("missing_key")
    return [(_messages(obj["prompt"], "user"), obj)]


def select(scores: list[float], complete: list[bool], completions: list[str], keep: str,
           threshold: float | None) -> tuple[list[int], str | None]:
    """Which samples of one prompt are kept -> (indices, None) or ([], drop reason). ``best``: the first of the
    highest-scoring complete samples; ``threshold``: the first of each distinct completion scoring >= threshold."""
    candidates = [i for i in range(len(scores)) if complete[i]]
    if not candidates:
        return [], "all_truncated"
    if threshold is not None:
        candidates = [i for i in candidates if scores[i] >= threshold]
        if not candidates:
            return [], "below_threshold"
    if keep == "best":
        return [max(candidates, key=lambda i: (scores[i], -i))], None
    if keep == "pairs":  # (chosen, rejected): the first best and the first worst, when they differ
        best, worst = max(candidates, key=lambda i: (scores[i], -i)), min(candidates, key=lambda i: (scores[i], i))
        return ([best, worst], None) if scores[best] > scores[worst] else ([], "no_contrast")
    first: dict[str, int] = {}
    for i in candidates:
        first.setdefault(completions[i], i)
    return sorted(first.values()), None


def sample_prompts(model, tok, prompts: list[list[dict]], mine: list[int], dp_rank: int, dp_size: int,
                   args) -> list[list[list[int]]]:
    """K sampled completions (token ids) of each of this rank's prompts. Every rank makes the same number of
    generate calls (an expert- or tensor-parallel forward is collective), a rank out of prompts with an empty list;
    call c of data-parallel rank d is seeded seed + c dp_size + d (tensor-parallel peers draw alike)."""
    from posttrain.chat import render
    from pretrain.generate import generate

    per_call = max(1, args.batch_size // args.samples)  # prompts per generate call
    total = len(prompts)
    num_calls = -(-max(1, -(-total // dp_size)) // per_call)  # the largest rank's share, in calls
    out = []
    for call in range(num_calls):
        chunk = mine[call * per_call:(call + 1) * per_call]
        rows = [render(tok, prompts[i], add_generation_prompt=True)[0] for i in chunk for _ in range(args.samples)]
        seed = None if args.seed is None else args.seed + call * dp_size + dp_rank
        new = generate(model, rows, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=seed,
                       stop_ids=[tok.end_of_turn_id])
        out.extend(new[j * args.samples:(j + 1) * args.samples] for j in range(len(chunk)))
    return out


def rejection_sample(args) -> dict:
    """The whole run (every rank); returns the summary on rank 0, {} elsewhere."""
    from posttrain.chat import ChatTokenizer
    from posttrain.data import read_records
    from posttrain.rl.rewards import load_rewards, score
    from pretrain.generate import _gather_outputs, load_for_generation

    rewards = load_rewards(parse_reward_specs(args.rewards))  # a bad spec fails before the model loads
    skipped: dict = {}
    records = read_records([args.prompts], parse_prompt, skipped)
    if not records:
        raise ValueError(f"--prompts {args.prompts}: no valid prompt records (skipped: {skipped or 'none'}); each "
                         f"line is {{\"prompt\": str | messages, ...}}")
    model, tokenizer_path, (dp_rank, dp_size) = load_for_generation(args.checkpoint, args.trust_unverified)
    if tokenizer_path is None:
        raise ValueError(f"--checkpoint {args.checkpoint}: no tokenizer.model next to the weights")
    tok = ChatTokenizer(tokenizer_path)
    prompts = [messages for messages, _ in records]
    mine = list(range(len(prompts)))[dp_rank::dp_size]  # tensor-parallel peers share a dp rank
    outputs = _gather_outputs(mine, sample_prompts(model, tok, prompts, mine, dp_rank, dp_size, args), len(prompts))
    if outputs is None:
        return {}
    kept, seen, all_scores, kept_scores = [], set(), [], []
    dropped = {reason: 0 for reason in DROP_REASONS}
    for (messages, sample), samples in zip(records, outputs):
        complete = [bool(ids) and ids[-1] == tok.end_of_turn_id for ids in samples]
        texts = [tok.decode(ids[:-1] if done else ids) for ids, done in zip(samples, complete)]
        scores = [score(rewards, sample["prompt"], text, sample)[0] for text in texts]
        all_scores.extend(scores)
        chosen, reason = select(scores, complete, texts, args.keep, args.threshold)
        if reason:
            dropped[reason] += 1
        if args.keep == "pairs":
            chosen = [chosen] if chosen else []
        for i in chosen:
            if args.keep == "pairs":  # a preference pair (posttrain.rm / posttrain.dpo input)
                line = json.dumps({"prompt": messages, "chosen": texts[i[0]], "rejected": texts[i[1]]})
            else:
                line = json.dumps({"messages": messages + [{"role": "assistant", "content": texts[i]}]})
            if line not in seen:  # the same prompt twice in the file: its identical completions once
                seen.add(line)
                kept.append(line)
                kept_scores.append(scores[i[0] if args.keep == "pairs" else i])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("".join(line + "\n" for line in kept))
    return {"prompts": len(records), "samples": len(all_scores), "kept": len(kept),
            "mean_reward": sum(all_scores) / len(all_scores),
            "kept_mean_reward": sum(kept_scores) / len(kept_scores) if kept_scores else None,
            "dropped_prompts": dropped, "skipped_records": skipped}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m posttrain.rejection_sample", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="run directory (uses `latest`), step_NNNNNNN or HF folder")
    ap.add_argument("--prompts", required=True, help='RL prompts jsonl: {"prompt": str | messages, ...} per line')
    ap.add_argument("--output", required=True, help="SFT jsonl to write ({\"messages\": [...]} per kept sample)")
    ap.add_argument("--samples", type=int, default=4, help="K samples per prompt")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rewards", nargs="+", metavar="SPEC",
                    help="FN, FN=WEIGHT or '{fn: FN, weight: W}' (rl.rewards entries); default accuracy")
    ap.add_argument("--keep", choices=("best", "threshold", "pairs"), default="best",
                    help="pairs: a preference pair per prompt, its best vs its worst sample (on-policy pairs for "
                         "posttrain.rm / posttrain.dpo)")
    ap.add_argument("--threshold", type=float, default=None, help="minimum score kept (needed by --keep threshold)")
    ap.add_argument("--batch-size", type=int, default=256, help="sequences per generate call (prompts x samples)")
    ap.add_argument("--trust-unverified", action="store_true",
                    help="load a checkpoint without (or failing) its checksums.json (only checkpoints you produced)")
    return ap


def _check(args) -> None:
    if args.samples < 1:
        raise ValueError(f"--samples {args.samples}: need at least 1 sample per prompt")
    if args.temperature <= 0 and args.samples > 1:
        raise ValueError(f"--temperature {args.temperature} with --samples {args.samples}: greedy decoding gives "
                         f"the same completion K times; use a temperature > 0 (R1: 0.6-1.0) or --samples 1")
    if args.keep == "threshold" and args.threshold is None:
        raise ValueError("--keep threshold needs --threshold X (the minimum score kept)")


def main(argv: list[str] | None = None) -> int:
    from pretrain.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        _check(args)
        summary = rejection_sample(args)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"posttrain.rejection_sample: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    if summary:
        kept_mean = summary["kept_mean_reward"]
        print(f"rejection_sample: {summary['prompts']} prompts, {summary['samples']} samples, kept "
              f"{summary['kept']}, mean reward {summary['mean_reward']:.4f} (kept: "
              f"{'n/a' if kept_mean is None else f'{kept_mean:.4f}'}) -> {args.output}")
        print("dropped prompts: " + ", ".join(f"{k}={v}" for k, v in summary["dropped_prompts"].items())
              + "".join(f", {k}={v} (bad record)" for k, v in summary["skipped_records"].items()))
    return 0


if __name__ == "__main__":
    from pretrain.engine import exit_process

    exit_process(main())  # under torchrun: process group destroyed, no finalisation abort
