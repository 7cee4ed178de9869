"""Train and load the sentencepiece BPE tokenizer.

    python -m data_pipeline.tokenizer --input FILES... --vocab-size N --output PATH.model

Choices (Llama-style sentencepiece, lossless for code):

* BPE with ``byte_fallback`` (no ``<unk>`` on unseen characters) and ``split_digits``;
* ``identity`` normalization, no dummy prefix, no whitespace squashing: ``decode(encode(x)) == x`` for any
  UTF-8 text, indentation included;
* ``<bos>``, ``<eos>``, ``<pad>`` and the FIM sentinels ``<|fim_begin|>``, ``<|fim_hole|>``, ``<|fim_end|>``
  are *control* pieces: they have ids but are never produced from text, so a document that contains the
  string "<eos>" cannot inject an end of document (the builder inserts these ids itself);
* ``"\\n"`` is an atomic user-defined piece: pieces never span a newline, which lets ``Tokenizer.encode`` cut
  long documents at newlines (same ids, bounded memory, linear time).

Everything else reads the special ids from the model through ``load_tokenizer`` (never hard-coded).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm

from data_pipeline.readers import DataError, check_inputs, iter_documents

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
FIM_BEGIN, FIM_HOLE, FIM_END = "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"
NEWLINE = "\n"

# Documents longer than this are encoded newline-segment by newline-segment (see Tokenizer.encode): one
# sentencepiece call on a multi-megabyte string is superlinear in time and uses ~50x its size in memory.
SEGMENT_CHARS = 1 << 16


# Chat format (posttrain.chat): DeepSeek-style role and turn pieces, appended to a trained model as user-defined
# pieces by add_chat_tokens, and the jinja template transformers renders with them (pretrain.export).
USER, ASSISTANT, END_OF_TURN = "<｜User｜>", "<｜Assistant｜>", "<｜end_of_turn｜>"
CHAT_TOKENS = (USER, ASSISTANT, END_OF_TURN)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '" + USER + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '" + ASSISTANT + "' + message['content'] + '" + END_OF_TURN + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ASSISTANT + "' }}{%- endif -%}")
"""The jinja template transformers renders (``tokenizer.chat_template``): the same text as :func:`render_text`."""


def with_chat_tokens(proto_bytes: bytes) -> bytes:
    """A serialized sentencepiece model with the chat pieces appended as user-defined pieces (idempotent: pieces
    already present are kept where they are, so ids of existing pieces never move)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    model = model_pb2.ModelProto()
    model.ParseFromString(proto_bytes)
    have = {p.piece for p in model.pieces}
    for piece in CHAT_TOKENS:
        if piece not in have:
            new = model.pieces.add()
            new.piece, new.score, new.type = piece, 0.0, model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return model.SerializeToString()


def add_chat_tokens(source: str | os.PathLike, output: str | os.PathLike) -> str:
    """Write ``source`` (a sentencepiece ``.model``) with the chat pieces to ``output`` (atomically: every rank may
    write the same bytes); returns ``output``."""
    data = with_chat_tokens(Path(source).read_bytes())
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if not (output.is_file() and output.read_bytes() == data):
        tmp = output.with_name(f"{output.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, output)
    return str(output)


class FimIds(NamedTuple):
    begin: int
    hole: int
    end: int


class Tokenizer:
    """A loaded sentencepiece model plus the ids of its special pieces."""

    def __init__(self, path: str, segment_chars: int = SEGMENT_CHARS):
        self.path = os.path.abspath(path)
        with open(path, "rb") as f:
            proto = f.read()
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = self._special(BOS, self.sp.bos_id())
        self.eos_id = self._special(EOS, self.sp.eos_id())
        self.pad_id = self._special(PAD, self.sp.pad_id())
        fim = [self._special(p, -1) for p in (FIM_BEGIN, FIM_HOLE, FIM_END)]
        self.fim_ids = FimIds(*fim) if min(fim) >= 0 else None
        self.newline_id = self._special(NEWLINE, -1)
        self.segment_chars = segment_chars
        self._segmentable = _newline_is_atomic(proto)

    def _special(self, piece: str, fallback: int) -> int:
        idx = self.sp.piece_to_id(piece)
        return idx if idx != self.sp.unk_id() or piece == self.sp.id_to_piece(idx) else fallback

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, identical to ``SentencePieceProcessor.encode(text)``."""
        if len(text) <= self.segment_chars or not self._segmentable:
            return self.sp.encode(text)
        ids: list[int] = []
        for segment in self.encode_segments(text):
            ids += segment
        return ids

    def encode_segments(self, text: str):
        """Yield the ids of ``text`` in consecutive pieces whose concatenation is ``encode(text)``.

        "\n" is an atomic piece and no other piece contains it, so encode(a + "\n" + b) ==
        encode(a) + [newline_id] + encode(b): long texts are cut at a newline about every ``segment_chars``
        characters, which keeps time linear and memory bounded for a 50 MB document.
        """
        if len(text) <= self.segment_chars or not self._segmentable:
            yield self.sp.encode(text)
            return
        start, n = 0, len(text)
        while start < n:
            cut = text.rfind(NEWLINE, start, start + self.segment_chars)
            if cut < 0:
                cut = text.find(NEWLINE, start + self.segment_chars)
                cut = n if cut < 0 else cut
            ids = self.sp.encode(text[start:cut])
            if cut < n:
                ids.append(self.newline_id)
            yield ids
            start = cut + 1

    def decode(self, ids) -> str:
        """Text of ``ids`` (control pieces such as ``<eos>`` decode to nothing)."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, idx: int) -> str:
        return self.sp.id_to_piece(int(idx))

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _newline_is_atomic(proto: bytes) -> bool:
    """True when "\\n" is a user-defined piece and the normalizer cannot change text at a cut point."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as model_pb2
    except ImportError:  # protobuf missing: encode whole documents (slower, still exact)
        return False
    model = model_pb2.ModelProto()
    model.ParseFromString(proto)
    spec = model.normalizer_spec
    if spec.name != "identity" or spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        return False
    newline = [p for p in model.pieces if p.piece == NEWLINE]
    others = any(NEWLINE in p.piece for p in model.pieces if p.piece != NEWLINE)
    return bool(newline) and newline[0].type == model_pb2.ModelProto.SentencePiece.USER_DEFINED and not others


def load_tokenizer(path: str) -> Tokenizer:
    """Load a sentencepiece model; a missing or invalid file is a one-line ``DataError``."""
    if not path or not os.path.isfile(path):
        raise DataError(f"tokenizer model not found: {path} (train one with: python -m data_pipeline.tokenizer "
                        f"--input FILES... --vocab-size N --output {path or 'PATH.model'})")
    try:
        return Tokenizer(path)
    except (RuntimeError, OSError) as exc:
        raise DataError(f"{path} is not a sentencepiece model: {str(exc).splitlines()[0]}") from None


def _training_sentences(inputs: list[str], text_key: str, skipped: dict, stats: dict):
    """Non-empty lines of every valid document: newline is an atomic piece, so it never needs learning."""
    try:
        for text in iter_documents(inputs, text_key, skipped):
            stats["documents"] += 1
            stats["bytes"] += len(text)
            for line in text.split(NEWLINE):
                if line.strip():
                    yield line
    except DataError as exc:  # an exception would not cross sentencepiece's C++ loop cleanly: end, re-raise
        stats["error"] = exc


def train_tokenizer(inputs: list[str], vocab_size: int, output: str, text_key: str = "text",
                    input_sentence_size: int = 5_000_000, num_threads: int | None = None, seed: int = 0,
                    character_coverage: float = 0.9999, max_sentence_length: int = 16384) -> Tokenizer:
    """Train a BPE model on ``inputs`` and write it atomically to ``output``; returns the loaded tokenizer.

    ``input_sentence_size`` bounds memory on huge corpora: sentencepiece keeps a uniform random sample of
    that many lines (reservoir sampling over the whole stream) and shuffles it.
    """
    if vocab_size < 300:
        raise DataError(f"--vocab-size {vocab_size} is too small: it must hold 256 byte pieces and the "
                        f"special tokens; use at least 300 (real models use 32000-130000)")
    check_inputs(inputs)
    spm.set_random_generator_seed(seed)
    skipped: dict = {}
    stats = {"documents": 0, "bytes": 0}
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(inputs, text_key, skipped, stats), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            character_coverage=character_coverage, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, bos_piece=BOS, eos_piece=EOS, pad_piece=PAD,
            control_symbols=[FIM_BEGIN, FIM_HOLE, FIM_END], user_defined_symbols=[NEWLINE],
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=max_sentence_length, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2)
    except RuntimeError as exc:
        if "error" in stats:
            raise stats["error"] from None
        if stats["documents"] == 0:
            raise DataError(f"no valid document in the inputs (skipped: {skipped or 'none'})") from None
        raise DataError(f"sentencepiece training failed: {str(exc).splitlines()[0]}") from None
    if "error" in stats:
        raise stats["error"]
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, output)
    tok = load_tokenizer(output)
    tok.train_stats = {**stats, "skipped": skipped}
    return tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.tokenizer", description=__doc__.split("\n")[0],
                                     fromfile_prefix_chars="@")
    parser.add_argument("--input", nargs="+", required=True,
                        help="files (.jsonl[.gz|.zst], .parquet, text); @LIST reads arguments from a file, one a line")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output", required=True, help="PATH.model to write")
    parser.add_argument("--text-key", default="text", help="JSON/parquet field holding the text")
    parser.add_argument("--input-sentence-size", type=int, default=5_000_000,
                        help="lines sampled for training (bounds memory on huge corpora)")
    parser.add_argument("--num-threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    try:
        tok = train_tokenizer(args.input, args.vocab_size, args.output, args.text_key, args.input_sentence_size,
                              args.num_threads, args.seed)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stats = tok.train_stats
    print(f"wrote {tok.path}: vocab {tok.vocab_size}, bos {tok.bos_id} eos {tok.eos_id} pad {tok.pad_id} "
          f"fim {tuple(tok.fim_ids)}; trained on {stats['documents']} documents "
          f"({stats['bytes'] / 1e6:.1f} M chars, skipped {stats['skipped'] or 'none'}) in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
