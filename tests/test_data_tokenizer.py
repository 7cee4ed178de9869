"""Tokenizer: training CLI, special ids read from the model, lossless round trips, one-line errors."""
import os

import pytest
import sentencepiece as spm

from data_pipeline.readers import DataError
from data_pipeline.tokenizer import FIM_BEGIN, FIM_END, FIM_HOLE, load_tokenizer
from helpers import run_cli, stdlib_files, stdlib_texts, trained_tokenizer


def test_cli_trains_a_loadable_model(tmp_path):
    out = tmp_path / "t.model"
    (tmp_path / "list.txt").write_text("\n".join(stdlib_files(15)) + "\n")  # @LIST: argparse reads args from it
    res = run_cli("data_pipeline.tokenizer", "--input", f"@{tmp_path / 'list.txt'}", "--vocab-size", "600",
                  "--output", str(out), "--num-threads", "1")
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 600 and "vocab 600" in res.stdout
    # the special pieces exist, are distinct and are what the loader reports
    sp = spm.SentencePieceProcessor(model_file=str(out))
    named = {sp.id_to_piece(i): i for i in (tok.bos_id, tok.eos_id, tok.pad_id, *tok.fim_ids)}
    assert named == {"<bos>": tok.bos_id, "<eos>": tok.eos_id, "<pad>": tok.pad_id, FIM_BEGIN: tok.fim_ids.begin,
                     FIM_HOLE: tok.fim_ids.hole, FIM_END: tok.fim_ids.end}
    assert all(sp.is_control(i) for i in named.values())
    assert len(tok.sha256) == 64 and tok.path == str(out)


def test_round_trip_is_lossless_and_specials_cannot_be_injected():
    tok = load_tokenizer(trained_tokenizer())
    samples = stdlib_texts(3, start=60) + [
        "\tdef f(x):\n\t\treturn x  # trailing  \n\n\n",
        "  leading spaces, unicode é ß 東京 😀, CRLF\r\nend",
        "literal specials: <eos> <bos> <pad> <|fim_begin|> <|fim_hole|> <|fim_end|>",
        "control and odd characters: \x00\x01 a\u200b\ufeffb\r c \U0010ffff \u0301e",
    ]
    specials = {tok.bos_id, tok.eos_id, tok.pad_id, *tok.fim_ids}
    for text in samples:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not specials & set(ids)  # a document's text never turns into a control id
    assert tok.encode("12345") == [tok.sp.piece_to_id(d) for d in "12345"]  # digits are split


def test_segmented_encoding_equals_sentencepiece():
    """Long documents are encoded in newline-cut segments: the ids must equal one sentencepiece call."""
    tok = load_tokenizer(trained_tokenizer())
    sp = spm.SentencePieceProcessor(model_file=tok.path)
    text = "".join(stdlib_texts(4, start=70))
    for segment_chars in (50, 997, 4096):
        tok.segment_chars = segment_chars
        for t in (text, "\n" + text + "\n\n", "x" * 3000 + "\n" + "y" * 10):
            assert tok.encode(t) == sp.encode(t)


def test_missing_tokenizer_is_one_line(tmp_path):
    with pytest.raises(DataError, match="tokenizer model not found") as err:
        load_tokenizer(str(tmp_path / "nope.model"))
    assert "\n" not in str(err.value)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        load_tokenizer(str(bad))


@pytest.mark.parametrize("args, message", [
    (["--input", "/no/such/file.jsonl", "--vocab-size", "500"], "input file not found: /no/such/file.jsonl"),
    (["--input", stdlib_files(1)[0], "--vocab-size", "100000"], "Vocabulary size too high"),
    (["--input", stdlib_files(1)[0], "--vocab-size", "100"], "too small"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    res = run_cli("data_pipeline.tokenizer", *args, "--output", str(tmp_path / "x.model"))
    assert res.returncode != 0
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "x.model")
