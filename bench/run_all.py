"""Every benchmark of the project in one run: prints the tables and writes bench/results.md.

    python bench/run_all.py [--quick] [--threads 2] [--compile] [--skip data parallel layouts]

Sections (figures side by side from the same run; the variants of a table alternate step by step):
  1. training step, ours vs transformers' DeepseekV3 on the same weights, fp32 and bf16, for ``small-moe`` and the
     reference architecture (hidden 256, 4 layers, 16 experts top-4, batch 4 x 512)   -- bench_model.py
  2. activation checkpointing none / selective / full: step time (one process, alternating) and the peak
     resident memory of one step (a fresh process per mode)                              -- bench_memory.py
  3. data pipeline vs raw sentencepiece                                                   -- bench_data.py
  4. dp2 vs dp2 ep2 on the same global batch                                              -- bench_parallel.py
  5. each parallel layout on 2 processes through pretrain.train, peak RSS per rank vs pretrain.info's estimate
                                                                                          -- bench_layouts.py
FLOPs convention: ``pretrain.info.flops_per_token`` = Megatron-LM's (3 x forward, 2 FLOPs per multiply-add,
causal attention halved), main model only. MFU is over the measured fp32 GEMM rate at the bench's thread count
(what ``pretrain.metrics`` uses on CPU), also for bf16 steps.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_layouts  # noqa: E402
import bench_memory  # noqa: E402
import bench_model as bm  # noqa: E402

RESULTS = os.path.join(HERE, "results.md")
NOTES = """\
- Step tables: the variants alternate step by step in one process and each figure is the minimum over the rounds
  (other jobs on the machine only add time). "step CPU-s" is this process's CPU time: with one thread it is robust
  to other jobs; with two, waiting OpenMP workers spin and count, so the wall clock is the figure to read.
- Both sides step with `AdamW(fused=True)`: our loop's default (`pretrain.engine`) and transformers' `Trainer`
  default on torch >= 2.8 (`adamw_torch_fused`). "compile=blocks" / "compile=model" = `train.compile`.
- bf16 = bf16 weights/activations/gradients with fp32 master weights in AdamW (DeepSpeed's bf16 mode).
- Layouts: one run after another (not alternated), so their "vs dp2" ratios carry the machine's load changes.
  The pretrain.info estimate has no allocator caching, gloo/DeepSpeed buffers or data-pipeline memory: compare
  it with "peak - framework", which still includes those.
- Data pipeline targets need two otherwise idle cores; with other jobs running the 2-worker row cannot scale.
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        flags = open("/proc/cpuinfo").read()
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if re.search(rf"\b{f}\b", flags)]
        return f"{names[0] if names else platform.processor()} ({', '.join(isa)})"
    except OSError:
        return platform.processor() or platform.machine()


def machine(threads: int) -> list[str]:
    import deepspeed
    import transformers

    return [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible",
            f"- torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__},"
            f" Python {platform.python_version()}",
            f"- threads per process (torch.set_num_threads / OMP_NUM_THREADS for trainers): {threads}",
            f"- load average at start: {os.getloadavg()[0]:.1f} (other jobs share these cores: the CPU-time columns "
            "are the robust ones)"]


class Report:
    """Collects markdown sections, prints each as it is done and rewrites ``out`` (partial results survive)."""

    def __init__(self):
        self.parts: list[str] = []
        self.preamble, self.out = "", None

    def section(self, title: str, body: str) -> None:
        text = f"## {title}\n\n{body.rstrip()}\n\n_load average after: {os.getloadavg()[0]:.1f}_\n"
        print("\n" + text, flush=True)
        self.parts.append(text)
        if self.out:
            with open(self.out, "w") as f:
                f.write(self.preamble + "\n" + "\n".join(self.parts))


def model_steps(report: Report, args, gemm: dict) -> dict:
    """Section 1. Returns {arch: rows} for the targets (eager and, with --compile, compiled rows together).

    The compiled variants get their own table (with ours and transformers again as anchors), built after the
    eager models are freed: eight models with their optimizer states and compiled graphs alive at once slowed
    every variant in one process."""
    eager = ["ours", "transformers", "ours bf16"] + ([] if args.quick else ["transformers bf16"])
    tables = [("eager", eager)]
    if args.compile:
        tables.append(("train.compile", ["ours", "transformers", "ours compile=blocks", "ours compile=model",
                                         "ours bf16 compile=blocks", "ours bf16 compile=model"]))
    out = {}
    for name in ("small-moe", "reference"):
        cfg, batch, seq = bm.arch(name)
        flops = bm.step_flops(cfg, batch, seq)
        out[name] = []
        for kind, variants in tables:
            steps = bm.make_steps(cfg, batch, seq, variants)
            rows = bm.summarize(bm.alternate(steps, args.rounds), batch * seq, flops, gemm, "transformers")
            out[name] += [r for r in rows if r["name"] not in {o["name"] for o in out[name]}]
            split = ""
            if name == "reference" and kind == "eager":
                split = ("\n\nWhere the time goes (one profiled step each; profiler overhead included):\n\n"
                         + bm.format_breakdown(bm.breakdown(steps)))
            report.section(f"Training step: {name}, {kind} (batch {batch} x {seq}, {flops / 1e9:.2f} GFLOP/step, "
                           f"{args.rounds} alternating rounds)", bm.format_rows(rows, "transformers") + split)
            del steps
            gc.collect()
            torch._dynamo.reset()
    return out


def checkpointing(report: Report, args, gemm: dict) -> dict:
    """Section 2: step time alternating in one process, memory from one process per mode."""
    cfg, batch, seq = bm.arch("reference")
    torch.manual_seed(0)
    model = bm.build_model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    step = bm.train_step(model, ids)

    def with_mode(mode):
        def run():
            model.set_activation_checkpointing(mode)
            return step()
        return run
    modes = ("none", "selective", "full")
    times = bm.alternate({m: with_mode(m) for m in modes}, args.rounds)
    rows = {r["name"]: r for r in bm.summarize(times, batch * seq, bm.step_flops(cfg, batch, seq), gemm, "none")}
    mem = {r["mode"]: r for r in bench_memory.run_modes("reference", modes, args.threads)}
    lines = ["| mode | step s (wall) | step CPU-s | extra time (wall) | extra time (CPU) | peak RSS MiB | "
             "step peak MiB | step peak vs none |", "|" + "---|" * 8]
    for m in modes:
        r, k = rows[m], mem[m]
        lines.append(f"| {m} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | {1 / r['x_wall'] - 1:+.0%} | "
                     f"{1 / r['x_cpu'] - 1:+.0%} | {k['peak'] / 2**20:.0f} | {k['step_peak'] / 2**20:.0f} | "
                     f"{k['step_peak'] / mem['none']['step_peak'] - 1:+.0%} |")
    note = ("\n\nReference architecture, fp32. Step peak = resident-set high-water mark of one step minus the "
            "resident set before it (see bench/bench_memory.py); the same loss in every mode.")
    report.section("Activation checkpointing", "\n".join(lines) + note)
    return {m: (1 / rows[m]["x_wall"] - 1, mem[m]["step_peak"] / mem["none"]["step_peak"] - 1) for m in modes}


def script(report: Report, title: str, argv: list[str]) -> str:
    """Run one of the existing bench scripts; its output goes into the report verbatim."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=3600)
    text = proc.stdout if proc.returncode == 0 else f"FAILED ({proc.returncode}):\n{proc.stderr[-2000:]}"
    report.section(title, f"`python {' '.join(argv)}` ({time.perf_counter() - start:.0f} s)\n\n```\n{text.strip()}\n```")
    return text


def targets(models: dict, ckpt: dict, parallel_text: str) -> str:
    """The issue's targets, met or not, from this run's figures (wall-clock ratios; CPU-time ones alongside)."""
    ref = {r["name"]: r for r in models["reference"]}
    lines = ["| target | measured | met |", "|---|---|---|"]
    for name in ("ours", "ours compile=blocks", "ours compile=model"):
        if name in ref:
            r = ref[name]
            lines.append(f"| fp32 step >= 1.35x transformers (reference arch), {name} | {r['x_wall']:.2f}x wall, "
                         f"{r['x_cpu']:.2f}x CPU-time | {'yes' if r['x_wall'] >= 1.35 else 'no'} |")
            lines.append(f"| fp32 MFU >= 70% of the fp32 GEMM rate, {name} | {r['mfu_wall']:.0%} wall, "
                         f"{r['mfu_cpu']:.0%} CPU-time | {'yes' if r['mfu_wall'] >= 0.7 else 'no'} |")
    for name in ("ours bf16", "ours bf16 compile=blocks", "ours bf16 compile=model"):
        if name in ref:
            r = ref[name]
            lines.append(f"| bf16 step >= 2x transformers fp32, {name} | {r['x_wall']:.2f}x wall, "
                         f"{r['x_cpu']:.2f}x CPU-time | {'yes' if r['x_wall'] >= 2 else 'no'} |")
    for mode in ("selective", "full"):
        if mode in ckpt:
            extra, mem = ckpt[mode]
            ok = mem <= -0.40 and extra <= 0.35
            lines.append(f"| checkpointing {mode}: memory -40% at <= +35% time | {mem:+.0%} step peak, {extra:+.0%} "
                         f"step wall | {'yes' if ok else 'no'} |")
    m = re.search(r"dp2 ep2\s+[\d.]+\s+([\d.]+)x", parallel_text or "")
    if m:
        lines.append(f"| dp2 ep2 step <= 1.2x dp2 | {m.group(1)}x wall | {'yes' if float(m.group(1)) <= 1.2 else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller corpus, fewer steps")
    parser.add_argument("--threads", type=int, default=2, help="threads of the single-process benches")
    parser.add_argument("--compile", action="store_true", help="add the train.compile=blocks / model variants")
    parser.add_argument("--skip", nargs="*", default=[], choices=["models", "checkpointing", "data", "parallel",
                                                                  "layouts"])
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    args.rounds = 2 if args.quick else 5
    torch.set_num_threads(args.threads)
    report = Report()
    header = machine(args.threads)
    gemm = {clock: bm.gemm_flops_per_sec(clock=clock) for clock in ("wall", "cpu")}
    gemm_bf16 = {clock: bm.gemm_flops_per_sec(dtype=torch.bfloat16, clock=clock) for clock in ("wall", "cpu")}
    header.append(f"- measured GEMM rate (2048^3, best of 12, {args.threads} thread(s); by wall clock / by CPU time): "
                  f"fp32 {gemm['wall'] / 1e9:.1f} / {gemm['cpu'] / 1e9:.1f} GFLOP/s, "
                  f"bf16 {gemm_bf16['wall'] / 1e9:.1f} / {gemm_bf16['cpu'] / 1e9:.1f} GFLOP/s")
    header.append("- FLOPs: `pretrain.info.flops_per_token` (Megatron-LM: 3 x forward, 2 per multiply-add, causal "
                  "attention halved, no MTP); MFU over the fp32 GEMM rate by the same clock; ratios > 1 = faster than the baseline")
    print("\n".join(header), flush=True)
    title = "# Benchmarks" + (" (--quick)" if args.quick else "")
    report.preamble = (f"{title}\n\nWritten by `python bench/run_all.py {' '.join(sys.argv[1:])}`.\n\n"
                       + "\n".join(header) + "\n")
    report.out = args.out
    results = {"models": {}, "checkpointing": {}, "parallel": ""}
    sections = {
        "models": lambda: model_steps(report, args, gemm),
        "checkpointing": lambda: checkpointing(report, args, gemm),
        "data": lambda: script(report, "Data pipeline vs raw sentencepiece",
                               [os.path.join(HERE, "bench_data.py"), "--max-mb", "4" if args.quick else "40"]),
        "parallel": lambda: script(report, "Expert-parallel dispatch: dp2 vs dp2 ep2",
                                   [os.path.join(HERE, "bench_parallel.py"), "--steps", "3" if args.quick else "6"]),
        "layouts": lambda: report.section("Parallel layouts on 2 processes (small-moe, fp32, pretrain.train)",
                                          bench_layouts.format_rows(bench_layouts.bench("small-moe",
                                                                                        4 if args.quick else 8))),
    }
    for name, run in sections.items():
        if name in args.skip:
            continue
        try:
            results[name] = run()
        except Exception as e:  # one broken bench must not lose the others' figures
            report.section(f"{name}: FAILED", f"```\n{type(e).__name__}: {str(e)[-2000:]}\n```")
    if results["models"]:
        report.section("Targets (issue 7)", targets(results["models"], results["checkpointing"] or {},
                                                    results["parallel"] or ""))
    report.section("How to read these figures", NOTES)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
