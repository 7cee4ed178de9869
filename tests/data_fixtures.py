"""Shared helpers for the data_pipeline tests: real text (the stdlib sources) and a small trained tokenizer."""
from __future__ import annotations

import functools
import glob
import json
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np

STDLIB = sysconfig.get_paths()["stdlib"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stdlib_files(count: int, start: int = 0) -> list[str]:
    """``count`` top-level stdlib .py files in a fixed order."""
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))
    return files[start:start + count]


def stdlib_texts(count: int, start: int = 0) -> list[str]:
    return [open(f, encoding="utf-8", newline="").read() for f in stdlib_files(count, start)]


@functools.lru_cache(maxsize=None)
def trained_tokenizer(vocab_size: int = 1000) -> str:
    """Path of a BPE model trained once per test process on 40 stdlib files (~1 s)."""
    from data_pipeline.tokenizer import train_tokenizer
    out = os.path.join(tempfile.mkdtemp(prefix="dp_tok_"), f"tok{vocab_size}.model")
    train_tokenizer(stdlib_files(40), vocab_size, out, num_threads=1)
    return out


def write_jsonl(path: str, lines: list) -> str:
    """Write raw lines: dicts are JSON-encoded, bytes are written as they are."""
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode("utf-8"))
            f.write(b"\n")
    return path


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def write_token_dir(directory: str, docs: list[np.ndarray], shard_size_tokens: int = 1 << 30,
                    vocab_size: int = 60000, eos_id: int | None = None, sha256: str = "synthetic") -> str:
    """A build directory of synthetic documents (no tokenizer needed), as data_pipeline.build writes it."""
    from data_pipeline.shards import ShardWriter, token_dtype, write_manifest
    os.makedirs(directory, exist_ok=True)
    writer = ShardWriter(directory, token_dtype(vocab_size), shard_size_tokens)
    for doc in docs:
        writer.add_documents(np.asarray(doc), np.array([len(doc)]))
    shards = writer.finish()
    write_manifest(directory, {"documents": len(docs), "tokens": int(sum(len(d) for d in docs)), "shards": shards,
                               "tokenizer": {"path": "synthetic", "sha256": sha256, "eos_id": eos_id}})
    return directory
