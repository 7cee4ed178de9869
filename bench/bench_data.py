"""Data pipeline throughput on a real corpus: the Python standard library's source files.

    python bench/bench_data.py [--max-mb 40] [--vocab-size 8192] [--workers 1 2]

1. raw sentencepiece: ``SentencePieceProcessor.encode`` over every document in one process, texts already in
   memory (the limit one process can reach); again with ``Tokenizer.encode``'s newline segmentation (same
   ids; faster on the few files over 64 K characters, where one sentencepiece call is superlinear);
2. ``data_pipeline.build`` with 1 worker, then with 2 workers (reading files, tokenizing, writing shards).

Prints tokens/s, MB/s (UTF-8 bytes of the documents), tokens per CPU-second (this process and its workers:
robust to other load on the machine, unlike wall time) and the ratios. Targets: 1 worker >= 0.9x raw, 2 workers
>= 1.8x the 1-worker rate (needs two otherwise idle cores). The tokenizer is trained by this script once
and cached under /tmp.
"""
from __future__ import annotations

import argparse
import glob
import os
import resource
import shutil
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sentencepiece as spm  # noqa: E402

from data_pipeline.build import build  # noqa: E402
from data_pipeline.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

CACHE = os.path.join(tempfile.gettempdir(), "deepseek_pretrain_bench")


def stdlib_corpus(max_mb: float) -> list[str]:
    """Every stdlib .py file (site-packages excluded) in a fixed order, up to ``max_mb`` MB."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and os.path.isfile(f))
    chosen, size = [], 0
    for f in files:
        try:
            if not open(f, encoding="utf-8").read().strip():
                continue  # empty __init__.py files: the builder would skip them
        except UnicodeDecodeError:  # a few test files are deliberately not UTF-8; keep the raw run comparable
            continue
        if size + os.path.getsize(f) > max_mb * 1e6:
            break
        chosen.append(f)
        size += os.path.getsize(f)
    return chosen


def cached_tokenizer(files: list[str], vocab_size: int) -> str:
    path = os.path.join(CACHE, f"stdlib_bpe{vocab_size}.model")
    if not os.path.exists(path):
        start = time.time()
        train_tokenizer(files, vocab_size, path, input_sentence_size=2_000_000)
        print(f"trained {path} in {time.time() - start:.1f}s")
    return path


def cpu_seconds(children: bool = True) -> float:
    """CPU time of this process and (``children``) its finished children (the builder joins its workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + (kids.ru_utime + kids.ru_stime if children else 0.0)


def bench_raw(files: list[str], model: str, segmented: bool) -> tuple[float, float, int, int]:
    """``segmented``: the same newline segmentation as ``Tokenizer.encode`` (same ids, faster on big files)."""
    sp = spm.SentencePieceProcessor(model_file=model)
    encode = load_tokenizer(model).encode if segmented else sp.encode
    texts = [open(f, encoding="utf-8", newline="").read() for f in files]  # keep "\r\n" as the builder does
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(len(encode(t)) for t in texts)
    return time.perf_counter() - start, cpu_seconds() - cpu, tokens, nbytes


def bench_loader(shards: str, seq_length: int = 128, micro_batch: int = 8, global_batch: int = 32,
                 batches: int = 50) -> str:
    """What the training loop does per step to get its data: ``SampleStream.next_batch`` (megatron-core
    GPTDataset/BlendedDataset indexing over the memory-mapped shards, then stacking) for small-moe's shapes."""
    from data_pipeline.dataset import SampleStream, build_dataset

    ds = build_dataset([shards], None, seq_length, 1234, global_batch * (batches + 1))
    stream = SampleStream(ds, 0, 1, micro_batch)
    stream.next_batch(global_batch)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        stream.next_batch(global_batch)
        times.append(time.perf_counter() - start)
    best = min(times)
    return (f"loader (SampleStream.next_batch, global batch {global_batch} x {seq_length}, {micro_batch}-sequence "
            f"micro-batches): {best * 1e3:.2f} ms per step = {global_batch * seq_length / best / 1e6:.1f} M tokens/s")


def bench_build(files: list[str], model: str, workers: int, loader: list | None = None) -> tuple[float, float, int, dict]:
    out = os.path.join(CACHE, f"shards_w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    start, cpu, main_cpu = time.perf_counter(), cpu_seconds(), cpu_seconds(children=False)
    manifest = build(files, model, out, workers=workers, progress=False)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    manifest["main_cpu_s"] = cpu_seconds(children=False) - main_cpu  # reading, IPC, writing
    if loader is not None:
        loader.append(bench_loader(out))
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, cpu, manifest["tokens"], manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-mb", type=float, default=40.0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    os.makedirs(CACHE, exist_ok=True)
    files = stdlib_corpus(args.max_mb)
    model = cached_tokenizer(files, args.vocab_size)
    print(f"corpus: {len(files)} stdlib files; cores: {os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.1f}")

    raw_s, raw_cpu, raw_tokens, nbytes = bench_raw(files, model, segmented=False)
    rows = [("raw sentencepiece (1 process)", raw_s, raw_cpu, raw_tokens)]
    seg_s, seg_cpu, seg_tokens, _ = bench_raw(files, model, segmented=True)
    assert seg_tokens == raw_tokens
    rows.append(("raw, newline-segmented (1 proc)", seg_s, seg_cpu, seg_tokens))
    best_raw = min(raw_s, seg_s)
    main_cpu, loader = {}, []
    for workers in args.workers:
        elapsed, cpu, tokens, manifest = bench_build(files, model, workers, None if loader else loader)
        # the builder adds one <eos> per document; everything else must match the raw run
        assert tokens == raw_tokens + manifest["documents"], (tokens, raw_tokens, manifest["documents"])
        rows.append((f"build --workers {workers}", elapsed, cpu, tokens))
        main_cpu[workers] = manifest["main_cpu_s"]

    print(f"\n{nbytes / 1e6:.1f} MB, {raw_tokens:,} tokens ({nbytes / raw_tokens:.2f} bytes/token); "
          f"'x raw' is against the faster raw row\n")
    print(f"| {'run':32} | {'seconds':>7} | {'CPU s':>6} | {'M tok/s':>7} | {'MB/s':>5} | {'M tok/CPU-s':>11} "
          f"| {'x raw':>5} | {'x 1 worker':>10} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 8}|{'-' * 9}|{'-' * 7}|{'-' * 13}|{'-' * 7}|{'-' * 12}|")
    one_worker = next((s for name, s, _, _ in rows if name == "build --workers 1"), None)
    for name, seconds, cpu, tokens in rows:
        vs_one = f"{one_worker / seconds:.2f}" if one_worker and name.startswith("build") else ""
        print(f"| {name:32} | {seconds:7.2f} | {cpu:6.2f} | {tokens / seconds / 1e6:7.3f} | "
              f"{nbytes / seconds / 1e6:5.2f} | {tokens / cpu / 1e6:11.3f} | {best_raw / seconds:5.2f} | {vs_one:>10} |")
    for workers, seconds in main_cpu.items():
        print(f"build --workers {workers}: the main process used {seconds:.2f} CPU s (reading, IPC, writing); "
              f"the rest is the workers'")
    print("\n".join(loader))
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (the ratios are only meaningful on idle cores)")


if __name__ == "__main__":
    main()
