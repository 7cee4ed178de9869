"""Training-step throughput of our model vs transformers' DeepseekV3 on the same architecture and weights.

    python bench/bench_model.py [--rounds 4] [--threads 2] [--preset small-moe] [--variants ...]

Full step = forward, backward, AdamW step. Reference architecture: batch 4 x 512, hidden 256, 4 layers, 16 experts
top-4 (``REFERENCE``); ``--preset`` benches a preset's model at its micro-batch x seq_length instead. The models
alternate within one run (same weights via ``to_hf``) so machine noise hits all alike, and each figure is the
minimum over the rounds. Each step is timed by the wall clock and by this process's CPU time (with one thread the
CPU time is robust to other jobs; with two, idle OpenMP workers spin and count), so ratios are given from both. MFU = step FLOPs (``pretrain.info.flops_per_token``,
Megatron's convention: 3 x forward, 2 FLOPs per multiply-add, causal attention halved, no MTP) over the measured
fp32 GEMM rate at the same thread count. Also prints the expert-compute backends (``torch._grouped_mm`` vs a
loop over contiguous per-expert slices).

bf16 does what ``train.precision=bf16`` does through DeepSpeed: bf16 weights, activations and gradients (router,
norms and loss in fp32 inside the model), fp32 master weights in the AdamW step.
"""
from __future__ import annotations

import argparse
import os
import re
import tempfile
import time

import torch

from pretrain.config import ModelConfig, load_config
from pretrain.export import to_hf
from pretrain.model import build_model
import pretrain.model.moe as moe

REFERENCE = dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                 max_position_embeddings=512, attention="mla", q_lora_rank=128, kv_lora_rank=64,
                 qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=16, n_shared_experts=1,
                 num_experts_per_tok=4, moe_intermediate_size=256, first_k_dense_replace=1, n_group=4, topk_group=2,
                 routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid")
BENCH_CFG = REFERENCE  # the name bench scripts used first
BATCH, SEQ = 4, 512


def arch(name: str) -> tuple[ModelConfig, int, int]:
    """("reference" | a preset name) -> (model config without MTP, batch, seq)."""
    if name == "reference":
        return ModelConfig(**REFERENCE), BATCH, SEQ
    cfg = load_config(name, ["model.num_nextn_predict_layers=0"])
    return cfg.model, cfg.train.micro_batch_size, cfg.data.seq_length


def gemm_flops_per_sec(n: int = 2048, reps: int = 12, dtype: torch.dtype = torch.float32,
                       clock: str = "wall", device: str = "cpu") -> float:
    """Best-of matmul rate (2 n^3 FLOPs per product) in ``dtype`` at the current thread count.

    clock "wall": perf_counter; "cpu": this process's CPU time divided by the thread count (robust to other
    load on the machine when the threads do not spin; exact with one thread). On CUDA: wall clock, 8192^3, bf16
    unless fp32 is asked for (TF32 off), synchronised.
    """
    if device != "cpu":
        n, clock = max(n, 8192), "wall"
    timer = time.perf_counter if clock == "wall" else time.process_time
    scale = 1 if clock == "wall" else torch.get_num_threads()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t = timer()
        a @ b
        sync()
        best = min(best, (timer() - t) / scale)
    return 2 * n ** 3 / best


def step_flops(cfg: ModelConfig, batch: int, seq: int) -> float:
    """Training FLOPs of one step: pretrain.info's per-token count (fwd + bwd, no MTP) x tokens."""
    from pretrain.info import flops_per_token
    return flops_per_token(cfg, seq, include_mtp=False) * batch * seq


def time_expert_backends(rounds: int = 3) -> dict:
    """Forward+backward of one GroupedExperts layer at reference size, per backend (seconds, best of rounds)."""
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
            t = time.process_time()
            experts(x, idx, w).sum().backward()
            times.append(time.process_time() - t)
        results[name] = min(times[1:])
    moe._HAS_GROUPED_MM = has
    return results


def master_weight_step(model: torch.nn.Module, **adamw):
    """An optimizer step like DeepSpeed's bf16 mode: AdamW on fp32 master copies, bf16 weights copied back."""
    params = [p for p in model.parameters() if p.requires_grad]
    master = [p.detach().float().requires_grad_() for p in params]
    opt = torch.optim.AdamW(master, **adamw)

    def step() -> None:
        for m, p in zip(master, params):
            m.grad = p.grad.float()
        opt.step()
        with torch.no_grad():
            for m, p in zip(master, params):
                p.copy_(m)
    return step


ADAMW = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)


def train_step(model: torch.nn.Module, ids: torch.Tensor, hf: bool = False, bf16_master: bool = False):
    """A closure running one full step (zero_grad, forward, backward, AdamW) on ids (B, T+1); returns the loss.

    AdamW with ``fused=True`` on both sides: what our loop runs (``pretrain.engine`` passes ``fused`` to DeepSpeed's
    ``torch_adam``) and transformers' ``Trainer`` default on torch >= 2.8 (``adamw_torch_fused``), so the ratio
    compares the models' forward/backward, not optimizer choices."""
    adamw = {**ADAMW, "fused": True}
    optimizer_step = (master_weight_step(model, **adamw) if bf16_master
                      else torch.optim.AdamW(model.parameters(), **adamw).step)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if hf:
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts labels inside
        else:
            out = model(ids[:, :-1], labels=ids[:, 1:])
            loss = out.lm_loss + 1e-4 * out.seq_aux_loss
        loss.backward()
        optimizer_step()
        return loss.item()
    return step


def transformers_twin(model: torch.nn.Module, cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """transformers' DeepseekV3 with our model's weights (through ``to_hf``), in train mode."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        to_hf(model, cfg, d)
        return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).train()


VARIANTS = ("ours", "transformers", "ours bf16", "transformers bf16", "ours compile=blocks", "ours compile=model",
            "ours bf16 compile=blocks", "ours bf16 compile=model")


def make_steps(cfg: ModelConfig, batch: int = BATCH, seq: int = SEQ, variants=("ours", "transformers"),
               device: str = "cpu") -> dict:
    """name -> step closure, all on the same initial weights and batch. Variants: ``VARIANTS``; "compile=blocks"
    and "compile=model" are what ``train.compile`` does (``DeepSeekModel.compile_blocks()`` / ``model.compile()``)."""
    torch.manual_seed(0)
    base = build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    steps = {}
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"variant {name!r}: use one of {', '.join(VARIANTS)}")
        bf16 = "bf16" in name
        if name.startswith("transformers"):
            model = transformers_twin(base, cfg, torch.bfloat16 if bf16 else torch.float32).to(device)
            steps[name] = train_step(model, ids, hf=True, bf16_master=bf16)
            continue
        model = build_model(cfg).train()
        model.load_state_dict(base.state_dict())
        model.to(device, torch.bfloat16 if bf16 else torch.float32)
        if name.endswith("compile=blocks"):
            model.compile_blocks()
        elif name.endswith("compile=model"):
            model.compile()
        steps[name] = train_step(model, ids, bf16_master=bf16)
    return steps


def alternate(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Run the closures in turn ``rounds`` times after ``warmup`` untimed rounds.

    Returns name -> {"wall": [s...], "cpu": [s...]} (wall clock and this process's CPU time per call)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: {"wall": [], "cpu": []} for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()  # returns loss.item(): the step has finished on any device
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def write_section(title: str, body: str) -> None:
    """Replace the section ``## title`` of bench/results.md (up to the next '## ') or append it: for the benches
    that run_all.py does not run (it rewrites the file, so run them after it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.md")
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    section = f"## {title}\n\n{body.rstrip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def breakdown(steps: dict, repeats: int = 2) -> list[dict]:
    """Per variant, one profiled step (the fastest of ``repeats``): the time inside GEMM kernels (mm, addmm, bmm:
    the projections, experts, attention products and head) and the rest (elementwise, softmax, norms, routing,
    optimizer, framework). The GEMM part bounds how fast the step can get at this machine's GEMM rate."""
    from torch.profiler import profile

    rows = []
    for name, fn in steps.items():
        best = None
        for _ in range(repeats):
            with profile() as prof:
                fn()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1e6
            gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
            if best is None or total < best["total_s"]:
                best = {"name": name, "total_s": total, "gemm_s": gemm, "other_s": total - gemm}
        rows.append(best)
    return rows


def format_breakdown(rows: list[dict]) -> str:
    lines = ["| variant | profiled step s | in GEMM kernels s | other s | GEMM share |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['total_s']:.3f} | {r['gemm_s']:.3f} | {r['other_s']:.3f} | "
                     f"{r['gemm_s'] / r['total_s']:.0%} |")
    return "\n".join(lines)


def summarize(times: dict, tokens: int, flops: float, gemm: dict, baseline: str) -> list[dict]:
    """Rows: min wall s, min CPU s, tokens/s and MFU from each, speed ratio vs ``baseline`` from each.

    Minimum over the rounds for both clocks: other jobs on a shared machine only ever add time.

    gemm: {"wall": rate, "cpu": rate} (``gemm_flops_per_sec`` with each clock), the MFU denominators."""
    rows = []
    for name, t in times.items():
        wall, cpu = min(t["wall"]), min(t["cpu"])
        rows.append({"name": name, "wall_s": wall, "cpu_s": cpu, "tok_s_wall": tokens / wall,
                     "tok_s_cpu": tokens / cpu, "mfu_wall": flops / wall / gemm["wall"],
                     "mfu_cpu": flops / cpu / (gemm["cpu"] / torch.get_num_threads())})
    ref = next(r for r in rows if r["name"] == baseline)
    for r in rows:
        r["x_wall"], r["x_cpu"] = ref["wall_s"] / r["wall_s"], ref["cpu_s"] / r["cpu_s"]
    return rows


def format_rows(rows: list[dict], baseline: str) -> str:
    head = (f"| variant | step s (wall, min) | step CPU-s (min) | tokens/s (wall) | tokens/s (CPU) | MFU (wall) "
            f"| MFU (CPU) | vs {baseline} (wall) | vs {baseline} (CPU) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['name']} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {r['tok_s_wall']:.0f} | "
                     f"{r['tok_s_cpu']:.0f} | {r['mfu_wall']:.1%} | {r['mfu_cpu']:.1%} | {r['x_wall']:.2f}x | "
                     f"{r['x_cpu']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="timed steps per variant (alternating)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="reference", help="reference or a preset name (e.g. small-moe)")
    parser.add_argument("--variants", nargs="+", default=["ours", "transformers", "ours bf16"], choices=VARIANTS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GEMM rate and MFU then on that device)")
    parser.add_argument("--breakdown", action="store_true", help="also profile one step per variant: GEMM vs rest")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, batch, seq = arch(args.preset)
    # MFU denominator: the fp32 GEMM rate on CPU (as pretrain.metrics), the bf16 one on a GPU (tensor cores)
    gemm_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    gemm = {clock: gemm_flops_per_sec(clock=clock, device=args.device, dtype=gemm_dtype) for clock in ("wall", "cpu")}
    backends = time_expert_backends() if args.device == "cpu" else {}
    steps = make_steps(cfg, batch, seq, args.variants, args.device)
    times = alternate(steps, args.rounds)
    print(f"{args.preset}: threads={args.threads} batch={batch}x{seq} rounds={args.rounds} (alternating)")
    print(f"measured {str(gemm_dtype)[6:]} GEMM rate: {gemm['wall'] / 1e9:.1f} GFLOP/s wall, {gemm['cpu'] / 1e9:.1f} GFLOP/s "
          "CPU time (2048^3 matmul, best of 12)")
    print("expert compute fwd+bwd CPU-s (16 experts, top-4, 2048 tokens): "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in backends.items()))
    flops = step_flops(cfg, batch, seq)
    print(f"step FLOPs: {flops / 1e9:.1f} GFLOP (pretrain.info.flops_per_token, Megatron convention, no MTP)")
    baseline = "transformers" if "transformers" in times else next(iter(times))
    print(format_rows(summarize(times, batch * seq, flops, gemm, baseline), baseline))
    if args.breakdown and args.device == "cpu":
        print(format_breakdown(breakdown(steps)))


if __name__ == "__main__":
    main()
