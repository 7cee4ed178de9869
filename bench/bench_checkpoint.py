"""Step stall of a checkpoint, synchronous vs asynchronous (``train.async_save``), for ``small-moe``.

    python bench/bench_checkpoint.py [--rounds 5] [--no-write]

One process (the engine built by ``pretrain.train.setup``, ZeRO 1, fp32) trains a step so Adam's state exists,
then alternates, round after round, a synchronous and an asynchronous save (``pretrain.checkpoint.save_checkpoint``)
of the same state into two run directories. Per save:

- stall: the time ``save_checkpoint`` blocks the training thread (sync: DeepSpeed's files, the layout-free state,
  checksums, ``latest``; async: the snapshot of the fp32 masters and moments to host memory, then it returns);
- next step: the training step right after the save (async: while the writer thread runs, on the same cores);
- to `latest`: from the call to ``latest`` naming the checkpoint (async: ``wait_for_pending_save`` after the step).

Medians over the rounds, wall clock; the plain step time is measured in the same rounds. Appends (or replaces) its
section of bench/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_model import write_section  # noqa: E402

TITLE = "Checkpoint step stall: sync vs async save (issue 14)"


def synthetic_data(directory: Path, vocab: int = 8192, docs: int = 400) -> Path:
    """Random-token shards (no tokenizer): the save does not depend on what was trained on."""
    from data_pipeline.shards import ShardWriter, token_dtype, write_manifest
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    writer = ShardWriter(str(directory), token_dtype(vocab), 1 << 30)
    lengths = rng.integers(100, 400, docs)
    for n in lengths:
        writer.add_documents(rng.integers(0, vocab, n), np.array([n]))
    write_manifest(str(directory), {"documents": docs, "tokens": int(lengths.sum()), "shards": writer.finish(),
                                    "tokenizer": {"path": "synthetic", "sha256": "synthetic", "eos_id": None}})
    return directory


def measure(rounds: int, work: Path) -> dict:
    from pretrain.checkpoint import save_checkpoint, wait_for_pending_save
    from pretrain.config import load_config
    from pretrain.train import setup, train_step

    data = synthetic_data(work / "data")
    cfg = load_config("small-moe", [f"data.paths=[{data}]", f"train.output_dir={work / 'run'}", "train.steps=1000",
                                    "train.keep_last=1", "train.log_interval=1000", "train.async_save=false",
                                    # the state saved does not depend on the batch: small steps keep the bench short
                                    "train.micro_batch_size=2", "train.global_batch_size=2"])
    run = setup(cfg)
    step = 1
    train_step(run, step)  # Adam's state exists from here on
    rows = {"plain": [], "sync": [], "async": []}
    for _ in range(rounds):
        step += 1
        t0 = time.perf_counter()
        train_step(run, step)
        rows["plain"].append({"step": time.perf_counter() - t0})
        for mode in ("sync", "async"):
            c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, output_dir=str(work / mode),
                                                                   async_save=mode == "async"))
            t0 = time.perf_counter()
            save_checkpoint(run.engine, c, run.state, run.schedule_state)
            t1 = time.perf_counter()
            step += 1
            train_step(run, step)
            t2 = time.perf_counter()
            wait_for_pending_save()
            t3 = time.perf_counter()
            rows[mode].append({"stall": t1 - t0, "step": t2 - t1, "latest": (t3 - t0) if mode == "async" else t1 - t0})
    size = sum(f.stat().st_size for f in (work / "sync").glob("step_*/**/*") if f.is_file())
    size_async = sum(f.stat().st_size for f in (work / "async").glob("step_*/**/*") if f.is_file())
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    return {"med": med, "bytes": size, "bytes_async": size_async, "rounds": rounds}


def table(res: dict) -> str:
    med = res["med"]
    ms = lambda s: f"{1000 * s:.0f}"  # noqa: E731
    lines = ["| save | step stall ms | next step ms (plain step " + ms(med["plain"]["step"]) + ") | to `latest` ms "
             "| files MB |", "|---|---|---|---|---|",
             f"| sync | {ms(med['sync']['stall'])} | {ms(med['sync']['step'])} | {ms(med['sync']['latest'])} | "
             f"{res['bytes'] / 1e6:.1f} |",
             f"| async | {ms(med['async']['stall'])} | {ms(med['async']['step'])} | {ms(med['async']['latest'])} | "
             f"{res['bytes_async'] / 1e6:.1f} |",
             "", f"Stall ratio sync / async: **{med['sync']['stall'] / med['async']['stall']:.1f}x**; the step "
             f"after an async save takes {med['async']['step'] / med['plain']['step']:.2f}x a plain step (the "
             f"writer thread shares the cores). Sync also writes DeepSpeed's files "
             f"({res['bytes'] / res['bytes_async']:.2f}x the bytes); the async stall is the snapshot alone, "
             f"whatever is written."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    import torch
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        res = measure(args.rounds, Path(tmp))
    body = (f"`python bench/bench_checkpoint.py --rounds {args.rounds}` (small-moe, fp32, ZeRO 1, 1 process, "
            f"batch 2 x 128, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of {args.rounds} "
            f"alternating rounds, wall clock, load average {os.getloadavg()[0]:.1f}). Sync writes DeepSpeed's "
            f"engine files and the layout-free state; async only the layout-free state (fp32 masters + Adam "
            f"moments).\n\n"
            + table(res))
    print(body)
    if not args.no_write:
        write_section(TITLE, body)


if __name__ == "__main__":
    main()
