"""Expert-parallel overhead: step time of dp2 vs dp2 ep2 on the same global batch, and all-to-all bytes per step.

    python bench/bench_parallel.py [--preset small-moe] [--steps 6] [--seq 128]

Two gloo processes on the CPU, each a DeepSpeed ZeRO-1 engine (fp32, AdamW, clipping) on the preset's model; one
optimizer step = ``global_batch / (micro_batch * 2)`` micro-batches per rank. Step time is the median over
``--steps`` steps after one warm-up step, rank 0's clock (the ranks synchronise in every step). All-to-all bytes
are counted in ``dispatch``/``combine`` (activations only; the per-layer count exchange is E int64s): per step,
per rank, forward and backward (the backward all-to-alls move the same rows the other way), split into rows that
cross to the other rank and rows a rank sends to itself.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import parallel.expert as expert
from parallel import Topology, initialize_parallel, parallelize_model
from pretrain.config import load_config
from pretrain.model import build_model

# The gloo process harness of the multi-process tests (tests/helpers.py): test tooling, not in the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import run_distributed  # noqa: E402


def _count_all_to_all(counter: dict):
    """Wrap ``parallel.expert.all_to_all`` to add the bytes each call sends, to self and to other ranks."""
    original = expert.all_to_all

    def counting(x, output_splits, input_splits, group):
        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
        me = dist.get_rank(group)
        counter["self"] += input_splits[me] * row_bytes
        counter["cross"] += (sum(input_splits) - input_splits[me]) * row_bytes
        return original(x, output_splits, input_splits, group)

    expert.all_to_all = counting


def _bench(rank, world, preset, ep, steps, seq, results):
    import deepspeed

    cfg = load_config(preset, [f"parallel.ep={ep}", f"data.seq_length={seq}"])
    topo = Topology.from_config(cfg, world, rank=rank)
    initialize_parallel(topo)
    torch.manual_seed(0)
    model = parallelize_model(build_model(cfg.model), topo, cfg)
    t = cfg.train
    accumulation = t.global_batch_size // (t.micro_batch_size * topo.dp)
    engine, *_ = deepspeed.initialize(
        model=model, mpu=topo.deepspeed_mpu(), model_parameters=[{"params": list(model.parameters()), "name": "all"}],
        config={"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
                "gradient_accumulation_steps": accumulation, "gradient_clipping": 1.0,
                "zero_optimization": {"stage": 1}, "steps_per_print": 2**31 - 1,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})
    counter = {"self": 0, "cross": 0}
    _count_all_to_all(counter)
    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(steps + 1):
        counter.update(self=0, cross=0)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(accumulation):
            ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, seq + 1), generator=gen)
            out = engine(ids[:, :-1], labels=ids[:, 1:])
            engine.backward(out.lm_loss + 0.3 * torch.stack(out.mtp_losses).mean())
            engine.step()
        if step > 0:  # the first step pays for allocations and DeepSpeed's lazy set-up
            times.append(time.perf_counter() - start)
    if rank == 0:
        results[ep] = (statistics.median(times), 2 * counter["cross"], 2 * counter["self"],
                       t.global_batch_size * seq)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small-moe")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    for ep in (1, 2):
        run_distributed(_bench, 2, args.preset, ep, args.steps, args.seq, results)
    base = results[1][0]
    print(f"preset {args.preset}, 2 processes (gloo, CPU), seq {args.seq}, global batch tokens {results[1][3]}")
    print(f"{'layout':<10} {'step s':>8} {'vs dp2':>7} {'a2a cross-rank MiB/step/rank':>29} {'a2a to self MiB':>16}")
    for ep, name in ((1, "dp2"), (2, "dp2 ep2")):
        step, cross, own, _ = results[ep]
        print(f"{name:<10} {step:>8.3f} {step / base:>6.2f}x {cross / 2**20:>29.2f} {own / 2**20:>16.2f}")


if __name__ == "__main__":
    main()
