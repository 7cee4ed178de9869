"""The components we wrote instead of the plain PyTorch op, each against that op, at the reference bench's size.

    python bench/bench_components.py [--rounds 10] [--threads 2] [--no-write]

- head: ``LMHead(h, labels)`` (fused chunked linear + cross-entropy, pretrain/model/head.py) vs ``nn.Linear`` then
  ``F.cross_entropy`` (the (tokens x vocab) logits kept for backward); forward + backward, fp32;
- experts: one ``GroupedExperts`` layer with ``torch._grouped_mm`` vs the loop over per-expert slices
  (``bench_model.time_expert_backends``); forward + backward, fp32;
- dispatch gather: ``moe.gather_rows`` (backward = one ``index_add_``) vs ``x[index]`` (autograd's ``index_put_``
  with accumulation); forward + backward;
- AdamW step on the small-moe model's parameters: ``fused=True`` (our DeepSpeed config's ``torch_adam`` +
  ``fused``) vs the default ``foreach`` implementation.

Reference size (``bench_model.REFERENCE``): batch 4 x 512 tokens, hidden 256, vocabulary 8192, 16 experts top-4
(8,192 token copies). The two variants of a component alternate within each round; each figure is the minimum over
the rounds, wall clock and this process's CPU time. The blocked CPU attention against SDPA is in
``bench_attention.py``'s section. Appends (or replaces) its section of bench/results.md (``run_all.py`` rewrites
that file: run this after it).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pretrain.model.moe as moe  # noqa: E402
from bench_model import BATCH, REFERENCE, SEQ, alternate, time_expert_backends, write_section  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.model import build_model  # noqa: E402
from pretrain.model.head import LMHead  # noqa: E402

TITLE = "Components vs the plain PyTorch op"


def head_steps():
    """(ours, baseline) closures: fwd+bwd of the head on (BATCH x SEQ, hidden) activations, summed CE."""
    torch.manual_seed(0)
    n, hidden, vocab = BATCH * SEQ, REFERENCE["hidden_size"], REFERENCE["vocab_size"]
    head = LMHead(hidden, vocab)
    h = torch.randn(n, hidden, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))

    def fused():
        head(h, labels=labels).backward()

    def plain():
        F.cross_entropy(head(h), labels, reduction="sum").backward()
    return fused, plain


def gather_steps():
    """(ours, baseline) closures: fwd+bwd of the MoE dispatch gather (8,192 copies of 2,048 x hidden rows)."""
    torch.manual_seed(0)
    n, k = BATCH * SEQ, REFERENCE["num_experts_per_tok"]
    x = torch.randn(n, REFERENCE["hidden_size"], requires_grad=True)
    index = torch.randint(0, n, (n * k,))
    grad = torch.randn(n * k, REFERENCE["hidden_size"])  # a dense upstream gradient, as the experts give
    return (lambda: torch.autograd.grad(moe.gather_rows(x, index), x, grad)), \
        (lambda: torch.autograd.grad(x[index], x, grad))


def adamw_steps():
    """(ours, baseline) closures: one AdamW step over the small-moe model's parameters (random gradients)."""
    model = build_model(load_config("small-moe").model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    fused, plain = torch.optim.AdamW(params, fused=True, **kw), torch.optim.AdamW(params, foreach=True, **kw)
    return fused.step, plain.step


def measure(rounds: int) -> list[tuple[str, str, float, float, float, float]]:
    """-> [(component, "ours vs baseline", ours wall, ours CPU, baseline wall, baseline CPU)] in seconds."""
    rows = []
    for component, label, (ours, plain) in [
            ("head fwd+bwd (4 x 512 tokens, vocab 8192)", "fused chunked CE vs Linear + F.cross_entropy", head_steps()),
            ("dispatch gather fwd+bwd (8,192 copies)", "gather_rows vs x[index]", gather_steps()),
            ("AdamW step (small-moe parameters)", "fused vs foreach", adamw_steps())]:
        times = alternate({"ours": ours, "plain": plain}, rounds)  # minimum over the rounds: noise only adds
        rows.append((component, label, *(min(times[v][clock]) for v in ("ours", "plain") for clock in ("wall", "cpu"))))
    # Already benched in bench_model (CPU time, best of rounds): reuse it rather than a second copy.
    backends = time_expert_backends(rounds)
    if "grouped_mm" in backends:
        rows.append(("experts fwd+bwd (one layer, 16 experts top-4)", "torch._grouped_mm vs per-expert loop",
                     float("nan"), backends["grouped_mm"], float("nan"), backends["loop"]))
    return rows


def _ms(seconds: float) -> str:
    return "–" if math.isnan(seconds) else f"{seconds * 1e3:.1f}"


def table(rows) -> str:
    lines = ["| component | ours vs plain | ours ms (wall) | plain ms (wall) | ours CPU-ms | plain CPU-ms "
             "| speed-up (wall) | speed-up (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for component, label, ow, oc, pw, pc in rows:
        wall = "–" if math.isnan(ow) else f"{pw / ow:.2f}x"
        lines.append(f"| {component} | {label} | {_ms(ow)} | {_ms(pw)} | {_ms(oc)} | {_ms(pc)} | {wall} "
                     f"| {pc / oc:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = measure(args.rounds)
    body = "\n".join([
        f"`python bench/bench_components.py --threads {args.threads}` (fp32, {args.threads} thread(s), {args.rounds} "
        f"alternating rounds, torch {torch.__version__}; the experts row is CPU time only, from "
        f"bench_model.time_expert_backends). With one thread the CPU time is robust to other jobs on the machine, "
        f"the wall clock is not: on a loaded machine read the CPU columns.",
        "", table(rows), "",
        f"_load average before / after: {load:.1f} / {os.getloadavg()[0]:.1f}_"])
    print(f"## {TITLE}\n\n{body}")
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
