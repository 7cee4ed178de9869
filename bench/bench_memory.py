"""Activation checkpointing: peak memory of one training step per mode, each in a fresh process.

    python bench/bench_memory.py [--preset reference] [--modes none selective full]

Peak memory is the kernel's resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs``
after a warm-up step, so it covers exactly one forward + backward + AdamW step. glibc is told to serve every
allocation over 128 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``; setting it also turns off the adaptive
threshold), so freed tensors leave the resident set at once and the high-water mark follows the live tensors.
"step peak" is that mark minus the resident set just before the step (weights, AdamW state, the interpreter):
what activations, gradients and temporaries add; checkpointing can only shrink that part. Step time is measured
separately in one process, the modes alternating (``run_all.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(preset: str, mode: str, threads: int) -> dict:
    """In this process: one warm-up step, reset the high-water mark, one measured step. Sizes in bytes."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import arch, train_step
    from pretrain.model import build_model

    torch.set_num_threads(threads)
    cfg, batch, seq = arch(preset)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.set_activation_checkpointing(mode)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    step = train_step(model, ids)
    step()
    model.zero_grad(set_to_none=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _rss_kib("VmRSS")
    loss = step()
    peak = _rss_kib("VmHWM")
    return {"mode": mode, "before": before * 1024, "peak": peak * 1024, "step_peak": (peak - before) * 1024,
            "loss": loss}


def run_modes(preset: str, modes, threads: int = 1) -> list[dict]:
    """One fresh process per mode (the high-water mark of a process cannot be shared between modes)."""
    results = []
    for mode in modes:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "--preset", preset,
                               "--modes", mode, "--threads", str(threads)],
                              capture_output=True, text=True, env={**os.environ, **MMAP_ENV}, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"bench_memory worker ({mode}) failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="reference")
    parser.add_argument("--modes", nargs="+", default=["none", "selective", "full"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.preset, args.modes[0], args.threads)))
        return
    results = run_modes(args.preset, args.modes, args.threads)
    base = results[0]["step_peak"]
    print(f"| mode | RSS before step MiB | peak RSS MiB | step peak MiB | vs {results[0]['mode']} | loss |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['before'] / 2**20:.0f} | {r['peak'] / 2**20:.0f} | {r['step_peak'] / 2**20:.0f} | "
              f"{r['step_peak'] / base - 1:+.0%} | {r['loss']:.6f} |")


if __name__ == "__main__":
    main()
