"""Document readers shared by the tokenizer trainer and the shard builder.

Reading is split in two so that the builder's main process stays light:

* ``iter_raw_records(paths, text_key)`` (main process) streams *raw* records: the bytes of one JSONL line, the
  bytes of one text file, or the string of one parquet row. It never decodes or parses JSON.
* ``parse_record(kind, payload, text_key)`` (worker processes) turns one raw record into ``(text, None)`` or
  ``(None, reason)`` with ``reason`` one of ``SKIP_REASONS``.

Formats: ``.jsonl``/``.json``/``.ndjson`` (one JSON object per line; blank lines are not records), optionally
``.gz`` or ``.zst`` (needs ``zstandard``); ``.parquet`` (needs ``pyarrow``); anything else, e.g. ``.txt`` or
source files, is one document per file (``.gz``/``.zst`` allowed too).
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from typing import Iterator

# Why a record is skipped; every reason is always present in manifest.json["skipped"].
SKIP_REASONS = ("malformed_json", "missing_text_key", "non_string_text", "non_utf8", "empty")

# Raw record kinds (small ints: they are pickled once per record on the way to the workers).
KIND_JSON, KIND_TEXT, KIND_STR = 0, 1, 2

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(ValueError):
    """A user-facing data problem: the CLIs print its one-line message and exit non-zero."""


@dataclass(frozen=True)
class InputFile:
    path: str
    fmt: str  # "jsonl" | "text" | "parquet"
    compression: str | None  # None | "gzip" | "zstd"


def classify(path: str) -> InputFile:
    """Format and compression of ``path`` from its name."""
    name = path.lower()
    compression = None
    if name.endswith(".gz"):
        compression, name = "gzip", name[:-3]
    elif name.endswith(".zst") or name.endswith(".zstd"):
        compression, name = "zstd", name.rsplit(".", 1)[0]
    if name.endswith(".parquet"):
        if compression:
            raise DataError(f"{path}: compressed parquet is not supported (parquet compresses internally)")
        return InputFile(path, "parquet", None)
    fmt = "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"
    return InputFile(path, fmt, compression)


def expand_inputs(patterns: list[str]) -> list[str]:
    """Paths in the given order; an argument that does not exist but holds ``*?[`` is a (recursive) glob."""
    paths = []
    for pattern in patterns:
        if not os.path.exists(pattern) and any(c in pattern for c in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"input pattern {pattern!r} matches no file")
            paths.extend(matches)
        else:
            paths.append(pattern)
    return paths


def check_inputs(patterns: list[str]) -> list[InputFile]:
    """Expand and validate every input before any work starts: one clear error for the first bad one."""
    if not patterns:
        raise DataError("no input files given (pass --input FILE [FILE ...])")
    files = []
    for path in expand_inputs(patterns):
        if not os.path.exists(path):
            raise DataError(f"input file not found: {path}")
        if os.path.isdir(path):
            raise DataError(f"input {path} is a directory; pass files (a quoted glob like 'DIR/**/*.jsonl' works)")
        if not os.access(path, os.R_OK):
            raise DataError(f"cannot read input file {path}: permission denied")
        info = classify(path)
        if info.compression == "zstd":
            _require("zstandard", path, "zstd")
        if info.fmt == "parquet":
            _require("pyarrow", path, "parquet")
        files.append(info)
    return files


def _require(module: str, path: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise DataError(f"{path} needs the optional package '{module}': "
                        f"pip install {module}  (or pip install -e '.[{extra}]')") from None


def _open_binary(info: InputFile):
    if info.compression == "gzip":
        return gzip.open(info.path, "rb")
    if info.compression == "zstd":
        import zstandard
        raw = open(info.path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(info.path, "rb")


def iter_raw_records(files: list[InputFile], text_key: str,
                     parquet_batch_rows: int = 1024) -> Iterator[tuple[int, int, int, bytes | str | None]]:
    """Yield ``(file_index, line, kind, payload)`` for every record of every file, in order.

    ``line`` is 1-based (the JSONL line, the parquet row, 1 for a whole-file document). Decompression and
    I/O failures become a ``DataError`` naming the file.
    """
    for file_index, info in enumerate(files):
        try:
            if info.fmt == "parquet":
                yield from _iter_parquet(file_index, info, text_key, parquet_batch_rows)
            elif info.fmt == "jsonl":
                with _open_binary(info) as stream:
                    for line_no, line in enumerate(stream, 1):
                        if line.strip():  # blank lines separate nothing: they are not records
                            yield file_index, line_no, KIND_JSON, line
            else:
                with _open_binary(info) as stream:
                    yield file_index, 1, KIND_TEXT, stream.read()
        except DataError:
            raise
        except (OSError, EOFError, ValueError) as exc:  # truncated gzip, bad zstd frame, unreadable file
            raise DataError(f"cannot read {info.path}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # pyarrow/zstandard raise their own error classes
            raise DataError(f"cannot read {info.path}: {type(exc).__name__}: {exc}") from None


def _iter_parquet(file_index: int, info: InputFile, text_key: str, batch_rows: int):
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(info.path)
    if text_key not in parquet.schema_arrow.names:
        raise DataError(f"{info.path}: no column {text_key!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
                        f"pass --text-key")
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_key]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield file_index, row, KIND_STR, value


def parse_record(kind: int, payload, text_key: str) -> tuple[str | None, str | None]:
    """``(text, None)`` for a valid document, ``(None, reason)`` for a record to skip."""
    if kind == KIND_JSON:
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
        try:
            record = json.loads(line)
        except ValueError:
            return None, "malformed_json"
        if not isinstance(record, dict):
            return None, "malformed_json"
        if text_key not in record or record[text_key] is None:
            return None, "missing_text_key"
        text = record[text_key]
        if not isinstance(text, str):
            return None, "non_string_text"
    elif kind == KIND_TEXT:
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            return None, "non_utf8"
    else:
        if payload is None:
            return None, "missing_text_key"
        if isinstance(payload, bytes):
            try:
                payload = payload.decode("utf-8")
            except UnicodeDecodeError:
                return None, "non_utf8"
        if not isinstance(payload, str):
            return None, "non_string_text"
        text = payload
    if not text or text.isspace():
        return None, "empty"
    return text, None


def iter_documents(patterns: list[str], text_key: str = "text", skipped: dict | None = None) -> Iterator[str]:
    """Valid documents of the inputs, in order (the tokenizer trainer's reader). Counts skips into ``skipped``."""
    files = check_inputs(patterns)
    for _, _, kind, payload in iter_raw_records(files, text_key):
        text, reason = parse_record(kind, payload, text_key)
        if text is None:
            if skipped is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
            continue
        try:
            text.encode("utf-8")  # lone surrogates from JSON escapes cannot be tokenized
        except UnicodeEncodeError:
            if skipped is not None:
                skipped["non_utf8"] = skipped.get("non_utf8", 0) + 1
            continue
        yield text
