"""Training-step throughput of our model vs transformers' DeepseekV3 on the same architecture and weights.

    python bench/bench_model.py [--rounds 4] [--threads 2]

Full step = forward, backward, AdamW step, fp32, batch 4 x 512, hidden 256, 4 layers, 16 experts top-4. The two
models alternate within one run (same weights via ``to_hf``) so machine noise hits both alike. Also prints the
expert-compute backends (``torch._grouped_mm`` vs a loop over contiguous per-expert slices) and the fraction of
this machine's fp32 GEMM rate (measured with a large matmul) that each step reaches.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from pretrain.config import ModelConfig
from pretrain.export import to_hf
from pretrain.model import build_model
import pretrain.model.moe as moe

BENCH_CFG = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 max_position_embeddings=512, attention="mla", q_lora_rank=128, kv_lora_rank=64,
                 qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
                 num_experts_per_tok=4, moe_intermediate_size=256, first_k_dense_replace=1, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid")
BATCH, SEQ = 4, 512


def gemm_flops_per_sec(n: int = 2048, reps: int = 5) -> float:
    """Best-of fp32 matmul rate (2 n^3 FLOPs per product)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def step_flops(cfg: ModelConfig) -> tuple[float, str]:
    """Training FLOPs of one step: pretrain.info's per-token count (fwd+bwd, no MTP) when available, else 6N."""
    try:
        from pretrain.info import flops_per_token
        return flops_per_token(cfg, SEQ, include_mtp=False) * BATCH * SEQ, "pretrain.info.flops_per_token"
    except Exception:  # info is optional here: fall back to 6 x active non-embedding parameters
        h, L, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
        return 6.0 * BATCH * SEQ * (h * V + L * 12 * h * h), "6N estimate"


def time_expert_backends(rounds: int = 3) -> dict:
    """Forward+backward of one GroupedExperts layer at bench size, per backend (seconds, best of rounds)."""
    torch.manual_seed(0)
    E, K, H, I, N = 16, 4, 256, 256, BATCH * SEQ
    experts = moe.GroupedExperts(E, H, I)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(N, H, requires_grad=True)
    idx = torch.rand(N, E).topk(K, dim=-1).indices
    w = torch.rand(N, K)
    results, has = {}, moe._HAS_GROUPED_MM
    for name, flag in (("grouped_mm", True), ("loop", False)):
        if flag and not has:
            continue
        moe._HAS_GROUPED_MM = flag
        times = []
        for _ in range(rounds + 1):
            t = time.perf_counter()
            experts(x, idx, w).sum().backward()
            times.append(time.perf_counter() - t)
        results[name] = min(times[1:])
    moe._HAS_GROUPED_MM = has
    return results


def make_steps(cfg: ModelConfig):
    """Our model and transformers' DeepseekV3 with identical weights, each wrapped as a full training step."""
    import transformers

    torch.manual_seed(0)
    ours = build_model(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        to_hf(ours, cfg, d)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).train()
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step_ours() -> float:
        opt_ours.zero_grad(set_to_none=True)
        out = ours(ids[:, :-1], labels=ids[:, 1:])
        loss = out.lm_loss + 1e-4 * out.seq_aux_loss
        loss.backward()
        opt_ours.step()
        return loss.item()

    def step_theirs() -> float:
        opt_theirs.zero_grad(set_to_none=True)
        loss = theirs(ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts labels inside
        loss.backward()
        opt_theirs.step()
        return loss.item()

    return step_ours, step_theirs, theirs.config._experts_implementation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per model (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(**BENCH_CFG)
    gemm = gemm_flops_per_sec()
    backends = time_expert_backends()
    step_ours, step_theirs, hf_experts = make_steps(cfg)
    step_ours(), step_theirs()  # warm-up (allocator, lazy init)
    times = {"ours": [], "transformers": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", step_ours), ("transformers", step_theirs)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    flops, convention = step_flops(cfg)
    tokens = BATCH * SEQ
    print(f"threads={args.threads}  batch={BATCH}x{SEQ}  fp32  rounds={args.rounds} (alternating, median)")
    print(f"measured fp32 GEMM rate: {gemm / 1e9:.1f} GFLOP/s (2048^3 matmul, best of 5)")
    print("expert compute fwd+bwd (16 experts, top-4, 2048 tokens): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in backends.items()))
    print(f"transformers experts implementation: {hf_experts}")
    print(f"step FLOPs: {flops / 1e9:.1f} GFLOP ({convention})")
    print(f"{'model':<14}{'step s':>9}{'tokens/s':>11}{'GEMM frac':>11}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:<14}{t:>9.3f}{tokens / t:>11.0f}{flops / t / gemm:>11.1%}")
    print(f"ratio ours / transformers (tokens/s): {med['transformers'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
