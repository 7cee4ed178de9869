"""Attention with document masks (packed sequences): fwd+bwd of one attention call, without and with documents.

    python bench/bench_attention.py [--rounds 5] [--threads 2] [--batch 4] [--seq 2048] [--documents 8] [--no-write]

Shapes: the reference architecture of ``bench_model.py`` (MLA, 4 heads, qk head 64 + 32 = 96, value head 64), at
``--seq`` tokens with ``--documents`` documents per sequence (random boundaries, different in each batch row).
Variants, all through ``pretrain.model.attention._causal_sdpa``:

- blocked, causal: the CPU blocked path without documents (what training runs with the presets);
- blocked, documents: the same path with ``document_ids`` (key blocks before the block's first document skipped);
- SDPA, documents: ``F.scaled_dot_product_attention`` with the dense (B, 1, T, T) boolean mask (the path for CUDA,
  grouped heads and shapes over ``CHUNK_ELEMENTS``), forced here by setting ``CHUNK_ELEMENTS`` to 0;
- SDPA, causal: the same kernel without documents.

The variants alternate within each round (machine noise hits all alike); each figure is the minimum over the
rounds, by the wall clock and by this process's CPU time (idle OpenMP workers spin and count with 2 threads; on
a loaded machine the wall clock of small parallel ops suffers most). "score elements" = score elements the variant
computes over those of the causal blocked path (the dense mask: all T x T). Appends (or replaces) its section of
bench/results.md (``run_all.py`` rewrites that file: run this after it).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pretrain.model.attention as attention  # noqa: E402
from bench_model import REFERENCE, alternate, write_section  # noqa: E402

TITLE = "Attention with document masks (issue 12)"


def random_documents(batch: int, seq: int, documents: int, seed: int = 0) -> torch.Tensor:
    """document_ids (batch, seq): ``documents`` contiguous documents per row, boundaries uniform at random."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=g)[:documents - 1].add_(1).sort().values
        lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])]))
        rows.append(torch.repeat_interleave(torch.arange(documents), lengths))
    return torch.stack(rows)


def score_fraction(seq: int, document_ids: torch.Tensor | None, dense: bool) -> float:
    """Score elements computed over those of the causal blocked path (rows x keys summed over blocks)."""
    causal = sum((e - s) * e for s, e, _, _ in attention.block_plan(seq))
    if dense:
        return seq * seq / causal
    doc_start = None if document_ids is None else attention.document_starts(document_ids)
    return sum((e - s) * (e - ks) for s, e, ks, _ in attention.block_plan(seq, doc_start)) / causal


def fwd_bwd(q, k, v, scale, document_ids, sdpa: bool):
    """A closure: one forward + backward of ``_causal_sdpa`` (SDPA forced when ``sdpa``)."""
    def step():
        limit = attention.CHUNK_ELEMENTS
        attention.CHUNK_ELEMENTS = 0 if sdpa else limit
        try:
            out = attention._causal_sdpa(q, k, v, scale, document_ids=document_ids)
        finally:
            attention.CHUNK_ELEMENTS = limit
        torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return step


def measure(args) -> tuple[list[tuple[str, float, float, float]], torch.Tensor]:
    """-> ([(variant, wall s, CPU s (each the min over rounds), score fraction)], document_ids)."""
    torch.manual_seed(0)
    heads, nope, rope, dv = (REFERENCE[k] for k in ("num_attention_heads", "qk_nope_head_dim", "qk_rope_head_dim",
                                                     "v_head_dim"))
    B, T, dtype = args.batch, args.seq, getattr(torch, args.dtype)
    q = torch.randn(B, heads, T, nope + rope, dtype=dtype, requires_grad=True)
    k = torch.randn(B, heads, T, nope + rope, dtype=dtype, requires_grad=True)
    v = torch.randn(B, heads, T, dv, dtype=dtype, requires_grad=True)
    ids = random_documents(B, T, args.documents)
    scale = (nope + rope) ** -0.5
    variants = {"blocked, causal": (None, False), "blocked, documents": (ids, False),
                "SDPA, documents (dense mask)": (ids, True), "SDPA, causal": (None, True)}
    steps = {name: fwd_bwd(q, k, v, scale, d, sdpa) for name, (d, sdpa) in variants.items()}
    times = alternate(steps, args.rounds)
    return [(name, min(times[name]["wall"]), min(times[name]["cpu"]), score_fraction(T, d, sdpa))
            for name, (d, sdpa) in variants.items()], ids


def table(rows: list[tuple[str, float, float, float]]) -> str:
    wall0, cpu0 = rows[0][1], rows[0][2]
    lines = ["| variant | fwd+bwd ms (wall, min) | CPU-ms (min) | vs blocked causal (wall) | vs blocked causal (CPU) "
             "| score elements vs blocked causal |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {wall * 1e3:.1f} | {cpu * 1e3:.1f} | {wall0 / wall:.2f}x | {cpu0 / cpu:.2f}x | {frac:.2f} |"
              for name, wall, cpu, frac in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="one table per thread count")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/results.md alone")
    args = parser.parse_args()
    load, heads = os.getloadavg()[0], REFERENCE["num_attention_heads"]
    parts = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows, ids = measure(args)
        parts += [f"{threads} thread(s):", "", table(rows), ""]
        print(f"\n{threads} thread(s):\n{parts[-2]}", flush=True)
    lengths = torch.unique_consecutive(ids[0], return_counts=True)[1].tolist()
    loads = f"load average before / after: {load:.1f} / {os.getloadavg()[0]:.1f}"
    print(f"\n{loads}")
    body = "\n".join([
        f"`python bench/bench_attention.py` ({args.dtype}, batch {args.batch} x {args.seq}, {heads} heads, qk 96, "
        f"v 64 (the reference MLA), {args.documents} documents per sequence at random boundaries (row 0: "
        f"{lengths}), {args.rounds} alternating rounds, torch {torch.__version__}). With one thread the CPU time is "
        "robust to other jobs; with two, every small parallel op of the blocked path waits for both threads, so "
        "on a loaded machine its wall clock (and the spinning CPU time) suffers far more than SDPA's one fused "
        "kernel.", "", *parts,
        "flex_attention (torch 2.13) is no alternative here: it has no backward on CPU, and on CUDA it needs "
        "torch.compile to run its fused kernel.", "",
        f"_{loads}_"])
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
