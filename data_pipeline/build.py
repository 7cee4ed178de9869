"""Tokenize documents in parallel and pack them into Megatron-compatible indexed shards.

    python -m data_pipeline.build --input FILES... --tokenizer PATH.model --output DIR --workers N
        [--fim-rate R] [--text-key text] [--seed S] [--shard-size-tokens N] [--strict] [--overwrite]

Pipeline: the main process streams raw records (bytes, no parsing) in chunks of about ``--chunk-bytes`` to a
pool of ``--workers`` processes, which parse, validate, (optionally FIM) and tokenize them, appending ``<eos>``
to every document; the main process takes the results back *in submission order* and appends them to the
shards. At most ``4 x workers`` chunks are in flight, so memory does not grow with the corpus, and the output
is byte-identical whatever the number of workers (FIM decisions depend on the record index, not the chunk).
"""
from __future__ import annotations

import argparse
import glob
import multiprocessing as mp
import os
import sys
import time
from collections import deque

import numpy as np

from data_pipeline.fim import fim_split, fim_tokens
from data_pipeline.readers import SKIP_REASONS, DataError, check_inputs, iter_raw_records, parse_record
from data_pipeline.shards import MANIFEST, ShardWriter, token_dtype, write_manifest
from data_pipeline.tokenizer import Tokenizer, load_tokenizer

DEFAULT_SHARD_SIZE_TOKENS = 1 << 30  # 2 GiB of uint16 per shard
LOG_FIRST_SKIPPED = 10

# ------------------------------------------------------------------------------------------ worker side

_WORKER: dict = {}


def _init_worker(tokenizer_path: str, text_key: str, fim_rate: float, seed: int, dtype: str) -> None:
    tok = Tokenizer(tokenizer_path)
    _WORKER.update(tok=tok, text_key=text_key, fim_rate=fim_rate, seed=seed, dtype=np.dtype(dtype))


def _encode_document(tok: Tokenizer, text: str, doc_index: int, fim_rate: float, seed: int,
                     dtype) -> tuple[list[np.ndarray], bool]:
    """Token arrays of one document (the last ends with eos) and whether FIM was applied."""
    parts = fim_split(text, doc_index, seed, fim_rate) if fim_rate > 0 else None
    if parts is not None:
        return [np.array(fim_tokens(tok.encode, *parts, tok.fim_ids, tok.eos_id), dtype=dtype)], True
    # Convert segment by segment: a 50 MB document never exists as one Python list of ints (~36 B/token).
    arrays = [np.array(ids, dtype=dtype) for ids in tok.encode_segments(text)]
    arrays.append(np.array([tok.eos_id], dtype=dtype))
    return arrays, False


def process_chunk(chunk: tuple[int, list]) -> tuple:
    """Parse and tokenize one chunk of raw records (runs in a worker).

    Returns ``(tokens (N,), lengths (D,), skips [(record_in_chunk, reason)], num_fim, valid_bytes)``.
    """
    base_index, records = chunk
    tok, text_key, dtype = _WORKER["tok"], _WORKER["text_key"], _WORKER["dtype"]
    fim_rate, seed = _WORKER["fim_rate"], _WORKER["seed"]
    arrays, lengths, skips = [], [], []
    num_fim = valid_bytes = 0
    for i, (_, _, kind, payload) in enumerate(records):
        text, reason = parse_record(kind, payload, text_key)
        if text is not None:
            try:
                doc, used_fim = _encode_document(tok, text, base_index + i, fim_rate, seed, dtype)
            except RuntimeError:  # lone surrogates (JSON "\ud800" escapes) have no UTF-8 form
                text, reason = None, "non_utf8"
        if text is None:
            skips.append((i, reason))
            continue
        arrays.extend(doc)
        lengths.append(sum(len(a) for a in doc))
        num_fim += used_fim
        valid_bytes += len(payload)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
    return tokens, np.array(lengths, dtype=np.int64), skips, num_fim, valid_bytes


# -------------------------------------------------------------------------------------------- main side


def _chunks(records, chunk_bytes: int, max_records: int = 8192):
    """Group raw records into ``(first_record_index, [records])`` of about ``chunk_bytes`` bytes."""
    chunk, size, base = [], 0, 0
    for record in records:
        chunk.append(record)
        payload = record[3]
        size += len(payload) if payload is not None else 0
        if size >= chunk_bytes or len(chunk) >= max_records:
            yield base, chunk
            base += len(chunk)
            chunk, size = [], 0
    if chunk:
        yield base, chunk


def prepare_output(output: str, overwrite: bool) -> None:
    """Create ``output``; a non-empty one is refused unless ``overwrite`` (then our old files are removed)."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"--output {output} exists and is not a directory")
    if os.path.isdir(output) and os.listdir(output):
        if not overwrite:
            raise DataError(f"output directory {output} is not empty; pass --overwrite to replace its shards")
        for path in [os.path.join(output, MANIFEST)] + glob.glob(os.path.join(output, "shard_*")):
            if os.path.isfile(path):
                os.remove(path)
    os.makedirs(output, exist_ok=True)


class _Progress:
    """tqdm bar over input bytes with documents/s, tokens/s and MB/s."""

    def __init__(self, total_bytes: int | None, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not enabled, mininterval=0.5,
                        smoothing=0.1, dynamic_ncols=True, desc="tokenize")
        self.start = self.last = time.time()
        self.docs = self.tokens = self.bytes = 0

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        self.bar.update(nbytes)
        now = time.time()
        if now - self.last >= 0.5:
            self.last = now
            self.bar.set_postfix_str(self.rates(), refresh=False)

    def rates(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed / 1e6:.2f} M tok/s, "
                f"{self.bytes / elapsed / 1e6:.1f} MB/s")

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def build(inputs: list[str], tokenizer: str, output: str, workers: int = 1, fim_rate: float = 0.0,
          text_key: str = "text", seed: int = 1234, shard_size_tokens: int = DEFAULT_SHARD_SIZE_TOKENS,
          strict: bool = False, overwrite: bool = False, progress: bool = True, chunk_bytes: int = 1 << 20) -> dict:
    """Build shards and ``output/manifest.json`` from ``inputs``; returns the manifest."""
    if workers < 1:
        raise DataError(f"--workers must be >= 1, got {workers}")
    if not 0.0 <= fim_rate <= 1.0:
        raise DataError(f"--fim-rate must be in [0, 1], got {fim_rate}")
    if shard_size_tokens < 1:
        raise DataError(f"--shard-size-tokens must be >= 1, got {shard_size_tokens}")
    files = check_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    if fim_rate > 0 and tok.fim_ids is None:
        raise DataError(f"--fim-rate {fim_rate} needs FIM sentinels, but {tokenizer} has none "
                        f"(train it with python -m data_pipeline.tokenizer)")
    prepare_output(output, overwrite)
    dtype = token_dtype(tok.vocab_size)
    compressed = any(f.compression or f.fmt == "parquet" for f in files)
    bar = _Progress(None if compressed else sum(os.path.getsize(f.path) for f in files), progress)
    pool = mp.get_context().Pool(workers, initializer=_init_worker,
                                 initargs=(tok.path, text_key, fim_rate, seed, np.dtype(dtype).name))
    writer = ShardWriter(output, dtype, shard_size_tokens)
    counts = {"documents": 0, "tokens": 0, "fim_documents": 0, "bytes": 0,
              "skipped": dict.fromkeys(SKIP_REASONS, 0)}
    ok = False
    try:
        pending: deque = deque()
        for chunk in _chunks(iter_raw_records(files, text_key), chunk_bytes):
            pending.append((chunk, pool.apply_async(process_chunk, (chunk,))))
            if len(pending) >= 4 * workers:
                _consume(*_pop(pending), files, writer, counts, bar, strict)
        while pending:
            _consume(*_pop(pending), files, writer, counts, bar, strict)
        shards = writer.finish()
        ok = True
    finally:
        bar.close()
        if ok:
            pool.close()
        else:
            pool.terminate()
            writer.abort()
            for shard in writer.shards:  # a failed build leaves no half-written data set behind
                for name in (shard["bin"], shard["idx"]):
                    os.remove(os.path.join(output, name))
        pool.join()
    manifest = _manifest(files, tok, dtype, shards, counts, fim_rate, seed, text_key, shard_size_tokens)
    write_manifest(output, manifest)
    print(f"wrote {counts['documents']:,} documents, {counts['tokens']:,} tokens in {len(shards)} shard(s) to "
          f"{output} ({bar.rates()}); skipped: {_skipped_summary(counts['skipped'])}", file=sys.stderr)
    return manifest


def _pop(pending: deque):
    chunk, result = pending.popleft()
    return chunk, result.get()


def _consume(chunk, result, files, writer: ShardWriter, counts: dict, bar: _Progress, strict: bool) -> None:
    """Account skips (strict: fail on the first) and append the chunk's documents to the shards."""
    tokens, lengths, skips, num_fim, valid_bytes = result
    base_index, records = chunk
    for i, reason in skips:
        file_index, line = records[i][0], records[i][1]
        where = f"{files[file_index].path}:{line}"
        if strict:
            raise DataError(f"{where}: bad record ({reason}); stopping because of --strict")
        counts["skipped"][reason] += 1
        if sum(counts["skipped"].values()) <= LOG_FIRST_SKIPPED:
            bar.write(f"skipped {where}: {reason}")
    if len(lengths):
        writer.add_documents(tokens, lengths)
    counts["documents"] += len(lengths)
    counts["tokens"] += len(tokens)
    counts["fim_documents"] += num_fim
    counts["bytes"] += valid_bytes
    bar.update(len(lengths), len(tokens), sum(len(r[3]) for r in records if r[3] is not None))


def _skipped_summary(skipped: dict) -> str:
    parts = [f"{reason} {n}" for reason, n in skipped.items() if n]
    return ", ".join(parts) if parts else "none"


def _manifest(files, tok, dtype, shards, counts, fim_rate, seed, text_key, shard_size_tokens) -> dict:
    # No timestamps or worker counts: the manifest is byte-identical across --workers.
    return {
        "format": "megatron-indexed",
        "documents": counts["documents"],
        "tokens": counts["tokens"],
        "dtype": np.dtype(dtype).name,
        "shards": shards,
        "shard_size_tokens": shard_size_tokens,
        "tokenizer": {"path": tok.path, "sha256": tok.sha256, "vocab_size": tok.vocab_size,
                      "bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                      "fim_ids": list(tok.fim_ids) if tok.fim_ids else None},
        "skipped": counts["skipped"],
        "fim_rate": fim_rate,
        "fim_documents": counts["fim_documents"],
        "seed": seed,
        "text_key": text_key,
        "valid_record_bytes": counts["bytes"],  # raw bytes of the kept records (JSON lines, files)
        "inputs": [f.path for f in files],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.build", description=__doc__.split("\n")[0],
                                     fromfile_prefix_chars="@")
    parser.add_argument("--input", nargs="+", required=True,
                        help="files: .jsonl[.gz|.zst], .parquet, anything else = one text document per file; "
                             "@LIST reads arguments from a file, one a line")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece PATH.model")
    parser.add_argument("--output", required=True, help="output directory (shards + manifest.json)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--fim-rate", type=float, default=0.0, help="fraction of documents in FIM (PSM); V3: 0.1")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the FIM decisions")
    parser.add_argument("--shard-size-tokens", type=int, default=DEFAULT_SHARD_SIZE_TOKENS)
    parser.add_argument("--chunk-bytes", type=int, default=1 << 20, help="raw bytes per worker task")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards of a non-empty --output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        build(args.input, args.tokenizer, args.output, args.workers, args.fim_rate, args.text_key, args.seed,
              args.shard_size_tokens, args.strict, args.overwrite, not args.no_progress, args.chunk_bytes)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; partial shards were removed", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
