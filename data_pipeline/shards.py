"""Megatron-compatible indexed shards (``PREFIX.bin`` + ``PREFIX.idx``) and the build manifest.

The files are exactly what megatron-core's ``IndexedDatasetBuilder`` writes (a test compares the bytes) and
what its ``IndexedDataset`` reads. We do not call that builder: importing ``megatron.core`` costs ~5 s of CPU
(it imports torch and probes Transformer Engine) in every build, its ``finalize`` walks the documents in a
Python loop, and it takes one call per document. This writer is numpy only, appends a whole worker chunk at
once, writes under temporary names renamed when a shard is complete, and rolls over to a new shard every
``shard_size_tokens``.

Layout of an output directory::

    DIR/manifest.json
    DIR/shard_00000.bin  DIR/shard_00000.idx
    DIR/shard_00001.bin  ...

``.idx`` layout (little endian): ``b"MMIDIDX\\x00\\x00"``, version ``<Q`` = 1, dtype code ``<B``, number of
sequences ``<Q``, number of document indices ``<Q``, sequence lengths ``int32[S]``, byte offsets of the
sequences in the ``.bin`` ``int64[S]``, document indices ``int64[D + 1]``. One document per sequence
(``document_indices == arange(D + 1)``), as Megatron's GPT datasets expect.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from data_pipeline.readers import DataError

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard_{:05d}"
_IDX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
_IDX_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
_IDX_CODES = {np.dtype(v).name: k for k, v in _IDX_DTYPES.items()}


def token_dtype(vocab_size: int) -> type:
    """Narrowest dtype megatron-core reads for token ids (its own rule: uint16 below 65500, else int32)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def write_idx(idx_path: str, dtype, lengths: np.ndarray) -> None:
    """Write the ``.idx`` of single-sequence documents with ``lengths (S,)`` tokens each."""
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
    pointers *= np.dtype(dtype).itemsize
    with open(idx_path, "wb") as f:
        f.write(_IDX_HEADER)
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _IDX_CODES[np.dtype(dtype).name]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(lengths) + 1))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.arange(len(lengths) + 1, dtype=np.int64).tobytes(order="C"))


class ShardWriter:
    """Appends documents to ``DIR/shard_NNNNN.{bin,idx}``, starting a new shard every ``shard_size_tokens``."""

    def __init__(self, output_dir: str, dtype, shard_size_tokens: int):
        self.output_dir, self.dtype, self.shard_size_tokens = output_dir, np.dtype(dtype), shard_size_tokens
        self.shards: list[dict] = []  # finished shards: prefix, bin, idx, documents, tokens
        self._bin = None
        self._lengths: list[np.ndarray] = []
        self._docs = self._tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents given as one flat token array ``(sum(lengths),)`` and their ``lengths (D,)``."""
        start_doc, offset = 0, 0
        while start_doc < len(lengths):
            if self._bin is None:
                self._open()
            # Whole documents only: take documents until this shard reaches its token budget.
            room = self.shard_size_tokens - self._tokens
            cum = np.cumsum(lengths[start_doc:])
            take = min(int(np.searchsorted(cum, room, side="left")) + 1, len(lengths) - start_doc)
            n_tokens = int(cum[take - 1])
            self._bin.write(np.ascontiguousarray(tokens[offset:offset + n_tokens], dtype=self.dtype).tobytes())
            self._lengths.append(np.asarray(lengths[start_doc:start_doc + take], dtype=np.int32))
            self._docs += take
            self._tokens += n_tokens
            start_doc += take
            offset += n_tokens
            if self._tokens >= self.shard_size_tokens:
                self._close()

    def _open(self) -> None:
        self._prefix = os.path.join(self.output_dir, SHARD_PATTERN.format(len(self.shards)))
        self._bin = open(self._prefix + ".bin.tmp", "wb")
        self._lengths, self._docs, self._tokens = [], 0, 0

    def _close(self) -> None:
        prefix = self._prefix
        self._bin.close()
        self._bin = None
        write_idx(prefix + ".idx.tmp", self.dtype, np.concatenate(self._lengths))
        # .idx last: a shard whose .idx exists is complete.
        os.replace(prefix + ".bin.tmp", prefix + ".bin")
        os.replace(prefix + ".idx.tmp", prefix + ".idx")
        name = os.path.basename(prefix)
        self.shards.append({"prefix": name, "bin": name + ".bin", "idx": name + ".idx",
                            "documents": self._docs, "tokens": self._tokens})

    def finish(self) -> list[dict]:
        if self._bin is not None and self._docs:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (its temporary files)."""
        if self._bin is not None:
            self._bin.close()
            self._bin = None
            for suffix in (".bin.tmp", ".idx.tmp"):
                if os.path.exists(self._prefix + suffix):
                    os.remove(self._prefix + suffix)


# ----------------------------------------------------------------------------------------------- reading


def read_idx_header(idx_path: str) -> tuple[type, int, np.ndarray]:
    """``(dtype, num_sequences, sequence_lengths)`` of an ``.idx`` file, with a one-line error if malformed."""
    try:
        with open(idx_path, "rb") as f:
            head = f.read(34)
            if len(head) < 34 or head[:9] != _IDX_HEADER:
                raise DataError(f"{idx_path} is not a Megatron .idx file (bad header)")
            code = head[17]
            num_sequences = struct.unpack("<Q", head[18:26])[0]
            lengths = np.fromfile(f, dtype=np.int32, count=num_sequences)
    except OSError as exc:
        raise DataError(f"cannot read {idx_path}: {exc.strerror}") from None
    if code not in _IDX_DTYPES or len(lengths) != num_sequences:
        raise DataError(f"{idx_path} is truncated or corrupt (expected {num_sequences} sequence lengths)")
    return _IDX_DTYPES[code], num_sequences, lengths


def check_shard(prefix: str, expect_tokens: int | None = None) -> int:
    """Check that ``prefix.bin``/``prefix.idx`` exist and agree; returns the shard's token count."""
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise DataError(f"missing shard file {path} (rebuild with python -m data_pipeline.build)")
    dtype, _, lengths = read_idx_header(idx_path)
    tokens = int(lengths.sum(dtype=np.int64))
    expect_bytes = tokens * np.dtype(dtype).itemsize
    actual = os.path.getsize(bin_path)
    if actual != expect_bytes:
        raise DataError(f"{bin_path} has {actual} bytes but {idx_path} describes {tokens} {np.dtype(dtype).name} "
                        f"tokens ({expect_bytes} bytes): the .bin/.idx pair is mismatched or truncated")
    if expect_tokens is not None and tokens != expect_tokens:
        raise DataError(f"{idx_path} holds {tokens} tokens but the manifest says {expect_tokens}: "
                        f"the shard does not belong to this manifest")
    return tokens


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise DataError(f"{directory} has no {MANIFEST}: not an output of python -m data_pipeline.build "
                        f"(pass a directory it wrote, or a shard prefix PATH for PATH.bin/PATH.idx)")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None


def write_manifest(directory: str, manifest: dict) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(directory, MANIFEST))
