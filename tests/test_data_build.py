"""Shard builder: exact tokens read back with megatron-core's reader, bad input accounting, determinism, FIM."""
import gzip
import hashlib
import json
import os
import sys
import warnings

import numpy as np
import pytest
import sentencepiece as spm

from data_pipeline.build import build
from data_pipeline.readers import DataError
from data_pipeline.shards import ShardWriter, check_shard, token_dtype, write_idx
from helpers import run_cli, stdlib_files, stdlib_texts, trained_tokenizer, write_jsonl


def read_documents(out_dir):
    """All documents of a build directory, in order, read with megatron-core's IndexedDataset."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    manifest = json.load(open(os.path.join(out_dir, "manifest.json")))
    docs = []
    for shard in manifest["shards"]:
        ds = IndexedDataset(os.path.join(out_dir, shard["prefix"]))
        assert len(ds) == shard["documents"] and int(ds.sequence_lengths.sum()) == shard["tokens"]
        assert ds.index.dtype == np.dtype(manifest["dtype"])
        docs += [ds[i].tolist() for i in range(len(ds))]
    return manifest, docs


def code_chunks(texts, max_chars=3000):
    """Split source files into many documents of varied size (blank-line separated blocks)."""
    docs = []
    for text in texts:
        block = ""
        for part in text.split("\n\n"):
            block += part + "\n\n"
            if len(block) > max_chars or len(part) % 7 == 0:
                docs.append(block)
                block = ""
        if block.strip():
            docs.append(block)
    return [d for d in docs if d.strip()]


def test_every_token_of_every_document_exactly_once(tmp_path):
    tok_path = trained_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    eos = sp.piece_to_id("<eos>")
    jsonl_docs = code_chunks(stdlib_texts(6, start=100)) + ["unicode: é ß 東京 😀\n", "x"]
    gz_docs = code_chunks(stdlib_texts(2, start=110))
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(jsonl_docs)])
    gz = tmp_path / "b.jsonl.gz"
    with gzip.open(gz, "wb") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in gz_docs).encode())
    txt_files = stdlib_files(3, start=120)
    manifest = build([str(jsonl), str(gz), *txt_files], tok_path, str(tmp_path / "out"), workers=2,
                     shard_size_tokens=20000, chunk_bytes=8192, progress=False)

    texts = jsonl_docs + gz_docs + [open(f, encoding="utf-8", newline="").read() for f in txt_files]
    expected = [sp.encode(t) + [eos] for t in texts]
    manifest, docs = read_documents(tmp_path / "out")
    assert docs == expected
    assert manifest["documents"] == len(texts) and manifest["tokens"] == sum(map(len, expected))
    assert len(manifest["shards"]) > 1 and all(s["tokens"] >= 20000 for s in manifest["shards"][:-1])
    assert manifest["dtype"] == "uint16" and manifest["skipped"] == dict.fromkeys(manifest["skipped"], 0)
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(open(tok_path, "rb").read()).hexdigest()
    assert manifest["tokenizer"]["eos_id"] == eos
    for shard in manifest["shards"]:  # no temporary names left behind; every pair consistent
        assert check_shard(str(tmp_path / "out" / shard["prefix"]), shard["tokens"]) == shard["tokens"]
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".tmp")]


def test_bad_records_are_counted_and_valid_neighbours_kept(tmp_path, capsys):
    good = [f"good document {i}\n    indented\n" for i in range(6)]
    lines = [
        {"text": good[0]},
        b'{"text": "unterminated',                    # 2 malformed_json
        {"text": good[1]},
        {"other": "no text key"},                     # 4 missing_text_key
        {"text": good[2]},
        b'{"text": "caf\xe9"}',                      # 6 non_utf8 (latin-1 byte)
        {"text": ""},                                 # 7 empty
        {"text": "  \n\t "},                          # 8 empty (whitespace only)
        {"text": good[3]},
        {"text": 5},                                  # 10 non_string_text
        b"[1, 2, 3]",                                 # 11 malformed_json (not an object)
        {"text": None},                               # 12 missing_text_key
        b'{"text": "lone \\ud800 surrogate"}',        # 13 non_utf8
        b"",                                          # blank line: not a record
        {"text": good[4]},
    ]
    bad = write_jsonl(tmp_path / "bad.jsonl", lines)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "ok.txt").write_text(good[5])
    files = [str(bad), str(tmp_path / "latin1.txt"), str(tmp_path / "blank.txt"), str(tmp_path / "ok.txt")]
    manifest = build(files, trained_tokenizer(), str(tmp_path / "out"), workers=2, progress=False)

    assert manifest["skipped"] == {"malformed_json": 2, "missing_text_key": 2, "non_string_text": 1,
                                   "non_utf8": 3, "empty": 3}
    tok = spm.SentencePieceProcessor(model_file=trained_tokenizer())
    _, docs = read_documents(tmp_path / "out")
    assert docs == [tok.encode(t) + [tok.piece_to_id("<eos>")] for t in good]
    log = capsys.readouterr().err
    for where in ("bad.jsonl:2: malformed_json", "bad.jsonl:6: non_utf8", "bad.jsonl:10: non_string_text",
                  "latin1.txt:1: non_utf8"):
        assert where in log


def test_strict_stops_at_the_first_bad_record(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "fine too"}, {"txt": "oops"}])
    out = tmp_path / "out"
    res = run_cli("data_pipeline.build", "--input", str(bad), "--tokenizer", trained_tokenizer(), "--output",
                  str(out), "--workers", "1", "--strict", "--no-progress")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {bad}:3: bad record (missing_text_key); "
                                               f"stopping because of --strict"]
    assert os.listdir(out) == []  # no manifest, no shard, no temporary file


@pytest.mark.parametrize("case", ["missing_input", "missing_tokenizer", "directory_input", "nonempty_output"])
def test_cli_errors_are_one_line(tmp_path, case):
    good = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    args = {"input": str(good), "tokenizer": trained_tokenizer(), "output": str(tmp_path / "out")}
    expect = {"missing_input": "input file not found: /no/such.jsonl",
              "missing_tokenizer": "tokenizer model not found: /no/tok.model",
              "directory_input": "is a directory",
              "nonempty_output": "is not empty; pass --overwrite"}[case]
    if case == "missing_input":
        args["input"] = "/no/such.jsonl"
    elif case == "missing_tokenizer":
        args["tokenizer"] = "/no/tok.model"
    elif case == "directory_input":
        args["input"] = str(tmp_path)
    else:
        os.makedirs(tmp_path / "out")
        (tmp_path / "out" / "keep.txt").write_text("x")
    res = run_cli("data_pipeline.build", "--input", args["input"], "--tokenizer", args["tokenizer"],
                  "--output", args["output"], "--workers", "1")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], res.stderr


def test_overwrite_replaces_previous_shards(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "first build " * 50}] * 40)
    two = write_jsonl(tmp_path / "two.jsonl", [{"text": "second"}])
    build([str(one)], trained_tokenizer(), str(tmp_path / "out"), shard_size_tokens=100, progress=False)
    with pytest.raises(DataError, match="not empty"):
        build([str(two)], trained_tokenizer(), str(tmp_path / "out"), progress=False)
    manifest = build([str(two)], trained_tokenizer(), str(tmp_path / "out"), overwrite=True, progress=False)
    assert manifest["documents"] == 1
    assert sorted(os.listdir(tmp_path / "out")) == ["manifest.json", "shard_00000.bin", "shard_00000.idx"]


def test_same_bytes_with_one_and_two_workers(tmp_path):
    docs = code_chunks(stdlib_texts(8, start=130), max_chars=1500)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in docs])
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        build([str(src), *stdlib_files(2, start=140)], trained_tokenizer(), str(out), workers=workers,
              fim_rate=0.3, shard_size_tokens=15000, chunk_bytes=4096 * workers, progress=False)
        outs.append({name: (out / name).read_bytes() for name in sorted(os.listdir(out))})
    assert len(outs[0]) > 3 and outs[0] == outs[1]


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_fim_rate_and_text_intact(tmp_path, rate):
    tok_path = trained_tokenizer()
    sp = spm.SentencePieceProcessor(model_file=tok_path)
    begin, hole, end, eos = (sp.piece_to_id(p) for p in ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>", "<eos>"))
    texts = [line for text in stdlib_texts(12, start=150) for line in text.split("\n") if line.strip()][:3000]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    manifest = build([str(src)], tok_path, str(tmp_path / "out"), workers=2, fim_rate=rate, seed=7,
                     progress=False)
    _, docs = read_documents(tmp_path / "out")
    assert len(docs) == len(texts) == 3000
    num_fim = 0
    for text, ids in zip(texts, docs):
        assert ids[-1] == eos and ids.count(eos) == 1
        if ids[0] != begin:
            assert ids == sp.encode(text) + [eos]
            continue
        num_fim += 1
        assert ids.count(begin) == ids.count(hole) == ids.count(end) == 1
        i, j = ids.index(hole), ids.index(end)
        prefix, suffix, middle = ids[1:i], ids[i + 1:j], ids[j + 1:-1]
        assert sp.decode(prefix) + sp.decode(middle) + sp.decode(suffix) == text
    assert abs(num_fim / len(texts) - rate) <= 0.02
    assert manifest["fim_documents"] == num_fim and manifest["fim_rate"] == rate


@pytest.mark.parametrize("vocab_size", [1000, 129280])
def test_writer_matches_megatron_builder_bytes(tmp_path, vocab_size):
    """Our writer and megatron-core's IndexedDatasetBuilder write the same bytes; its reader reads them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    dtype = token_dtype(vocab_size)
    assert dtype == (np.uint16 if vocab_size == 1000 else np.int32)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab_size, size=n) for n in rng.integers(1, 300, size=50)]
    ref = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for d in docs:
        ref.add_document(d, [len(d)])
    ref.finalize(str(tmp_path / "ref.idx"))
    writer = ShardWriter(str(tmp_path), dtype, shard_size_tokens=1 << 30)
    writer.add_documents(np.concatenate(docs[:20]), np.array([len(d) for d in docs[:20]]))
    writer.add_documents(np.concatenate(docs[20:]), np.array([len(d) for d in docs[20:]]))
    writer.finish()
    for ext in ("bin", "idx"):
        assert (tmp_path / f"shard_00000.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "shard_00000"))
    assert all(np.array_equal(ds[i], d) for i, d in enumerate(docs))


def test_zstd_and_parquet_inputs(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    texts = ["zstd one", "zstd two", "parquet one", "parquet two"]
    zst = tmp_path / "a.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"content": t}) + "\n" for t in texts[:2]).encode()))
    pq.write_table(pa.table({"content": [texts[2], None, texts[3]]}), str(tmp_path / "b.parquet"))
    manifest = build([str(zst), str(tmp_path / "b.parquet")], trained_tokenizer(), str(tmp_path / "out"),
                     text_key="content", progress=False)
    sp = spm.SentencePieceProcessor(model_file=trained_tokenizer())
    _, docs = read_documents(tmp_path / "out")
    assert docs == [sp.encode(t) + [sp.piece_to_id("<eos>")] for t in texts]
    assert manifest["skipped"]["missing_text_key"] == 1  # the null parquet row


@pytest.mark.parametrize("module, name", [("zstandard", "a.jsonl.zst"), ("pyarrow", "b.parquet")])
def test_missing_optional_dependency_is_one_line(tmp_path, monkeypatch, module, name):
    (tmp_path / name).write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # makes "import module" fail
    with pytest.raises(DataError, match=f"needs the optional package '{module}'"):
        build([str(tmp_path / name)], trained_tokenizer(), str(tmp_path / "out"), progress=False)


def test_bin_idx_mismatch_is_caught(tmp_path):
    """A .bin/.idx size mismatch is caught by check_shard (used before training)."""
    write_idx(str(tmp_path / "s.idx"), np.uint16, np.array([3, 4]))
    (tmp_path / "s.bin").write_bytes(b"\0" * 12)  # 6 tokens, the index says 7
    with pytest.raises(DataError, match="mismatched or truncated"):
        check_shard(str(tmp_path / "s"))


def test_corrupt_compressed_input_is_one_line(tmp_path):
    (tmp_path / "x.jsonl.gz").write_bytes(b"this is not gzip data")
    res = run_cli("data_pipeline.build", "--input", str(tmp_path / "x.jsonl.gz"), "--tokenizer", trained_tokenizer(),
                  "--output", str(tmp_path / "out"), "--workers", "1", "--no-progress")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: cannot read {tmp_path / 'x.jsonl.gz'}: "
                                               f"BadGzipFile: Not a gzipped file (b'th')"]
    assert os.listdir(tmp_path / "out") == []
