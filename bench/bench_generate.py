"""Generation speed: pretrain.generate (KV cache, MLA absorbed) against transformers' generate() on the export.

    python bench/bench_generate.py [--checkpoint RUN_DIR] [--rounds 3] [--threads 1] [--new-tokens 128] [--no-write]

Same weights (our model, exported with ``pretrain.export.to_hf`` and loaded by transformers in fp32), same prompts
(32-token windows of stdlib sources encoded with the run's tokenizer, or random tokens without a checkpoint; all of
one length so transformers needs no padding), greedy, exactly ``--new-tokens`` new tokens per prompt (no stop
token), batch 1 and 8. Ours with and without MTP self-speculative decoding (when the model has MTP modules; the
acceptance rate is only meaningful on a trained checkpoint: the quickstart's). Each figure is the best wall time of
``--rounds`` alternating rounds (the machine is shared). Writes its section of bench/results.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

from bench_model import write_section
from pretrain.export import to_hf
from pretrain.generate import generate

TITLE = "Generation: pretrain.generate vs transformers generate()"
PROMPT_TOKENS = 32


def load(checkpoint: str | None):
    """(model, model config, tokenizer path or None): a trained run, or small-moe at its initialisation."""
    if checkpoint:
        from pretrain.checkpoint import load_model_from_checkpoint
        model, cfg, tokenizer = load_model_from_checkpoint(checkpoint)
        return model.eval(), cfg.model, tokenizer
    from pretrain.config import load_config
    from pretrain.model import build_model
    cfg = load_config("small-moe")
    torch.manual_seed(0)
    return build_model(cfg.model).eval(), cfg.model, None


def make_prompts(tokenizer: str | None, vocab_size: int, count: int) -> list[list[int]]:
    if tokenizer is None:
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (count, PROMPT_TOKENS), generator=gen).tolist()
    import glob
    import sysconfig
    from data_pipeline.tokenizer import load_tokenizer
    tok = load_tokenizer(tokenizer)
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:count]
    return [tok.encode(open(f, encoding="utf-8").read()[:2000])[:PROMPT_TOKENS] for f in files]


def hf_generate(hf, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def measure(model, hf, prompts: list[list[int]], new_tokens: int, rounds: int, speculative: bool) -> list[dict]:
    """Rows per (batch, variant): best tokens/s over alternating rounds, acceptance, agreement with transformers."""
    rows = []
    for batch in (1, 8):
        batch_prompts = prompts[:batch]
        variants = {"transformers generate()": lambda: (hf_generate(hf, batch_prompts, new_tokens), {}),
                    "ours": lambda: _ours(model, batch_prompts, new_tokens, None)}
        if speculative:
            variants["ours + MTP speculative"] = lambda: _ours(model, batch_prompts, new_tokens, "mtp")
        best, outputs, stats = {}, {}, {}
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                outputs[name], stats[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        base = outputs["transformers generate()"]
        for name in variants:
            same = sum(a == b for o, r in zip(outputs[name], base) for a, b in zip(o, r)) / (batch * new_tokens)
            rows.append({"batch": batch, "variant": name, "tokens_per_s": batch * new_tokens / best[name],
                         "ratio": best["transformers generate()"] / best[name], "same_tokens": same,
                         "acceptance": stats[name].get("acceptance_rate"), "forwards": stats[name].get("forwards")})
    return rows


def _ours(model, prompts, new_tokens, speculative):
    stats: dict = {}
    return generate(model, prompts, new_tokens, speculative=speculative, stats=stats), stats


def table(rows: list[dict]) -> str:
    lines = ["| batch | variant | tokens/s | vs transformers | forwards | MTP acceptance | tokens equal to transformers' |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "–" if r["acceptance"] is None else f"{r['acceptance']:.1%}"
        fwd = "–" if r["forwards"] is None else str(r["forwards"])
        lines.append(f"| {r['batch']} | {r['variant']} | {r['tokens_per_s']:,.1f} | {r['ratio']:.2f}x | {fwd} | {acc} "
                     f"| {r['same_tokens']:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="a run or step directory (default: small-moe at initialisation)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="1 by default: on a shared machine more threads wait on each other")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    model, model_cfg, tokenizer = load(args.checkpoint)
    with tempfile.TemporaryDirectory() as hf_dir:
        to_hf(model, model_cfg, hf_dir)
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # exactly --new-tokens tokens, like ours without stop ids
    prompts = make_prompts(tokenizer, model_cfg.vocab_size, 8)
    load_avg = os.getloadavg()[0]
    with torch.no_grad():
        rows = measure(model, hf, prompts, args.new_tokens, args.rounds, len(model.mtp) > 0)
    source = args.checkpoint or "small-moe at initialisation (random weights)"
    body = "\n".join([
        f"`python bench/bench_generate.py{' --checkpoint ' + args.checkpoint if args.checkpoint else ''}` "
        f"({source}; fp32, {args.threads} threads, {PROMPT_TOKENS}-token prompts, {args.new_tokens} new tokens, "
        f"greedy, best of {args.rounds} alternating rounds, load average {load_avg:.1f} at the start, "
        f"torch {torch.__version__}, transformers {transformers.__version__}).", "", table(rows), "",
        "Ours: one batched prefill, then one forward per step over the pre-allocated cache (MLA: only c_KV and the "
        "RoPE key, W_UK/W_UV absorbed). 'tokens equal' compares with transformers' generate() position by "
        "position; a difference after a near-tie (fp32 reassociation) changes the rest of that row."])
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    sys.exit(main())
