"""Scale efficiency per layout: FLOPs, collective bytes and peak tensor memory per rank, each against its ideal.

    python bench/bench_scale.py [--preset small-moe] [--layouts dp2 tp2 ...] [--timing]

Every layout runs ``pretrain.train`` under ``torch.distributed.run`` (gloo, one thread per rank) with
``train.profile_step=2`` (pretrain/profiling.py: one step counted after a warm-up step) on the same global batch,
and one process runs it too. Per layout:

- FLOPs: the sum over ranks and the busiest rank against the ideal = the one-process count of the same step
  (model training FLOPs + activation recompute, as executed) / world size;
- bytes: the busiest rank's collective bytes (ring-algorithm bytes on the wire, all kinds) against
  ``pretrain.info.comm_bytes_per_rank``, the analytic minimum for the layout (TP: the activation all-reduces and
  the MoE rows' all-gathers; EP: the routed copies out and back; DP/ZeRO: gradient reduction and parameter
  all-gather over the (expert-)data-parallel group; PP: one activation per micro-batch per boundary each way);
- memory: the busiest rank's peak of live tensors (torch's MemTracker) against ``pretrain.info``'s per-rank
  estimate (``memory_per_rank_bytes``).

``--timing``: tp2 vs dp2 step time at the same global batch on a MoE-heavy variant (most FLOPs in the experts),
median tokens/s over the steps after the first, the layouts alternating run by run; tp2 both at dp2's micro-batch and
at twice it ("tp2 micro 8": each TP rank then runs as many expert rows per micro-batch as a dp2 rank).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHE = Path(tempfile.gettempdir()) / "deepseek_pretrain_bench" / "scale"
LAYOUTS = {
    "1": [], "dp2": [], "tp2": ["parallel.tp=2"], "dp2 ep2": ["parallel.ep=2"], "pp2": ["parallel.pp=2"],
    "tp2 dp2 ep2": ["parallel.tp=2", "parallel.ep=2"], "pp2 dp2 ep2": ["parallel.pp=2", "parallel.ep=2"],
    "tp2 pp2": ["parallel.tp=2", "parallel.pp=2"], "dp4 ep4": ["parallel.ep=4"],
    "dp2 zero0": ["parallel.zero_stage=0"], "dp2 zero2": ["parallel.zero_stage=2"],
    "dp2 ckpt full": ["train.activation_checkpointing=full"],
    "dp2 ckpt selective": ["train.activation_checkpointing=selective"],
    "dp2 all-reduce": ["deepspeed.zero_optimization.use_multi_rank_bucket_allreduce=true"],  # DeepSpeed's default
    "tp2 zero2": ["parallel.tp=2", "parallel.zero_stage=2"],
    "1 ckpt full": ["train.activation_checkpointing=full"],
    "1 ckpt selective": ["train.activation_checkpointing=selective"],
}
WORLD = {"1": 1, "dp2": 2, "tp2": 2, "dp2 ep2": 2, "pp2": 2, "tp2 dp2 ep2": 4, "pp2 dp2 ep2": 4, "tp2 pp2": 4,
         "dp4 ep4": 4, "dp2 zero0": 2, "dp2 zero2": 2, "dp2 ckpt full": 2, "dp2 ckpt selective": 2,
         "dp2 all-reduce": 2, "tp2 zero2": 2, "1 ckpt full": 1, "1 ckpt selective": 1}
# The bench's shards come from a 2048-piece tokenizer; micro batch 4 x global 16 suits every layout's dp.
COMMON = ["model.vocab_size=2048", "train.micro_batch_size=4", "train.global_batch_size=16", "train.precision=fp32",
          "train.save_interval=100000", "train.heatmap_interval=100000", "train.log_interval=1"]
# --timing only: tp2 with the micro-batch that gives each TP rank dp2's expert rows per micro-batch (the experts run on
# 1/tp of the rows, so at dp2's micro-batch each expert GEMM is half as tall and there are twice as many micro-batches)
TIMING_LAYOUTS = {"tp2 micro 8": ["parallel.tp=2", "train.micro_batch_size=8"]}
LAYOUTS_ALL = {**LAYOUTS, **TIMING_LAYOUTS}
WORLD["tp2 micro 8"] = 2
MOE_HEAVY = ["model.moe_intermediate_size=1024", "model.num_experts_per_tok=4", "model.n_shared_experts=0",
             "model.num_nextn_predict_layers=0"]


def run_layout(preset: str, name: str, data: Path, steps: int, extra: list[str], profile: bool) -> dict:
    """One ``pretrain.train`` run; returns tokens/s per step and the per-rank profiles."""
    tag = re.sub(r"\W+", "_", name) + ("_timing" if not profile else "")
    run_dir = CACHE / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    args = ["--config", preset, f"data.paths=[{data}]", f"train.output_dir={run_dir}", f"train.steps={steps}",
            *COMMON, *LAYOUTS_ALL[name], *extra] + (["train.profile_step=2"] if profile else [])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD[name]),
           "-m", "pretrain.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"layout {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rates = [float(m.replace(",", "")) for m in re.findall(r"tokens/s ([\d,]+)", proc.stdout)]
    profiles = sorted((json.loads(p.read_text()) for p in run_dir.glob("profile_step_2_rank_*.json")),
                      key=lambda r: r["rank"])
    shutil.rmtree(run_dir)  # its final checkpoint (~1.5 GB for small-moe): 17 layouts filled 40 GB of /tmp
    return {"layout": name, "rates": rates, "profiles": profiles}


def estimates(preset: str, name: str) -> dict:
    """pretrain.info's memory per rank and collective bytes per rank for the layout."""
    from pretrain.config import load_config
    from pretrain.info import comm_bytes_per_rank, inventory, memory_per_rank

    cfg = load_config(preset, [*COMMON, *LAYOUTS[name]])
    p = cfg.parallel
    dp = WORLD[name] // (p.tp * p.pp)
    inv, _ = inventory(cfg.model)
    return {"memory": memory_per_rank(cfg, inv, p.tp, p.pp, p.ep, dp)["memory_per_rank_bytes"],
            "bytes": comm_bytes_per_rank(cfg, inv, p.tp, p.pp, p.ep, dp),
            "minimum": comm_bytes_per_rank(cfg, inv, p.tp, p.pp, p.ep, dp, minimum=True)}


def profiles_of(preset: str, name: str, data: Path, reuse: bool) -> list[dict]:
    """The layout's per-rank profiles of step 2, from a fresh run (or the last run's files with ``reuse``)."""
    saved = CACHE / ("profiles_" + re.sub(r"\W+", "_", name) + ".json")
    if reuse and saved.exists():
        return json.loads(saved.read_text())
    profiles = run_layout(preset, name, data, 2, [], profile=True)["profiles"]
    saved.write_text(json.dumps(profiles))
    return profiles


def _reference(name: str) -> str:
    """The one-process run with the same activation checkpointing (the ideal includes its recompute)."""
    return next((f"1 {mode}" for mode in ("ckpt full", "ckpt selective") if name.endswith(mode)), "1")


def scale_rows(preset: str, layouts: list[str], data: Path, reuse: bool = False) -> list[dict]:
    rows = []
    for name in layouts:
        single = profiles_of(preset, _reference(name), data, reuse)[0]
        profiles, world = profiles_of(preset, name, data, reuse), WORLD[name]
        totals = [sum(p["comm_bytes"].values()) for p in profiles]
        est = estimates(preset, name)
        rows.append({
            "layout": name, "world": world, "ideal_flops": single["flops"] / world,
            "flops_sum": sum(p["flops"] for p in profiles), "flops_max": max(p["flops"] for p in profiles),
            "single_flops": single["flops"], "bytes_max": max(totals),
            "bytes_by_kind": {k: max(p["comm_bytes"][k] for p in profiles) for k in profiles[0]["comm_bytes"]},
            "bytes_estimate": est["bytes"]["total"], "bytes_minimum": est["minimum"]["total"],
            "peak_max": max(p["peak_bytes"] for p in profiles),
            "memory_split": max(profiles, key=lambda p: p["peak_bytes"])["memory"], "memory_estimate": est["memory"],
        })
    return rows


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def format_scale(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = ["| layout | ranks | FLOPs sum / ideal | busiest rank / ideal | bytes busiest rank MiB | "
             "pretrain.info bytes MiB (est / measured) | analytic minimum MiB (measured / min) | "
             "peak tensors MiB (w/g/opt/act/comm) | pretrain.info memory MiB (est / peak) |", "|" + "---|" * 9]
    for r in rows:
        split = r["memory_split"]
        parts = "/".join(f"{split[k] / mib:.0f}" for k in ("weights", "gradients", "optimizer", "activations",
                                                            "comm_buffers") if k in split)
        lines.append(
            f"| {r['layout']} | {r['world']} | {r['flops_sum'] / r['single_flops']:.3f} | "
            f"{r['flops_max'] / r['ideal_flops']:.3f} | {r['bytes_max'] / mib:.1f} | "
            f"{r['bytes_estimate'] / mib:.1f} ({_ratio(r['bytes_estimate'], r['bytes_max'])}) | "
            f"{r['bytes_minimum'] / mib:.1f} ({_ratio(r['bytes_max'], r['bytes_minimum'])}) | "
            f"{r['peak_max'] / mib:.0f} ({parts}) | {r['memory_estimate'] / mib:.0f} "
            f"({_ratio(r['memory_estimate'], r['peak_max'])}) |")
    return "\n".join(lines)


def timing(preset: str, data: Path, steps: int = 6, rounds: int = 2) -> str:
    """tp2 vs dp2 on the MoE-heavy variant, alternating; median tokens/s over the steps after the first."""
    from pretrain.config import load_config
    from pretrain.info import flops_breakdown

    rates = {"dp2": [], "tp2": [], "tp2 micro 8": [], "1": []}
    for _ in range(rounds):
        for name in rates:
            rates[name] += run_layout(preset, name, data, steps, MOE_HEAVY, profile=False)["rates"][1:]
    cfg = load_config(preset, [*COMMON, *MOE_HEAVY])
    m = cfg.model
    expert = 2 * 3 * m.hidden_size * m.moe_intermediate_size * m.num_experts_per_tok
    moe_layers = m.num_hidden_layers - m.first_k_dense_replace
    share = 3 * expert * moe_layers / flops_breakdown(m, cfg.data.seq_length)["main"]
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [f"MoE-heavy variant ({' '.join(MOE_HEAVY)}): routed experts {share:.0%} of the training FLOPs",
             "", "| layout | tokens/s (median) | step time vs dp2 |", "|---|---|---|"]
    lines += [f"| {k} | {v:.0f} | {med['dp2'] / v:.2f}x |" for k, v in med.items()]
    return "\n".join(lines)


def main() -> int:
    from bench_layouts import shards

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small-moe")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--timing", action="store_true", help="only the tp2 vs dp2 step-time table")
    parser.add_argument("--reuse", action="store_true", help="the last run's profiles (estimates recomputed)")
    args = parser.parse_args()
    data = shards()
    if args.timing:
        print(timing(args.preset, data))
        return 0
    rows = scale_rows(args.preset, args.layouts, data, args.reuse)
    print(format_scale(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
