"""Post-training data: chat and preference jsonl -> token rows the training loop's ``SampleStream`` slices.

Records (one JSON object per line; ``data.paths`` lists the files):

* SFT: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (at least one assistant turn);
* preferences: ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}`` (a str prompt
  is one user turn, a str response one assistant turn), or the ranked form ``{"prompt", "responses": [...],
  "ranking": [...]}`` with ``ranking[i]`` the rank of ``responses[i]`` (0 = best): every pair of different ranks
  becomes one preference pair (InstructGPT's K-choose-2 comparisons).

Bad records are skipped and counted by reason (``SKIP_REASONS``); the first few are logged with file:line.

Rows (``ds[i]`` is an np.int64 array, so ``data_pipeline.dataset.SampleStream`` batches them unchanged):

* ``SFTDataset``: ``(3, seq_length)`` = input ids, labels (the next token where it is trainable, else -100),
  document ids. Conversations are packed greedily in a per-epoch shuffled order (seed + epoch); each is its own
  document (``model(..., document_ids=...)``: no attention across conversations, positions restart), and the tail
  of a row is padding (pad id, label -100, a document of its own).
* ``PairDataset``: ``(7, seq_length)`` = chosen ids, chosen labels, chosen length, rejected ids, rejected labels,
  rejected length, pair index (the lengths and the index in column 0), one pair per row, right-padded.

Epochs: the row stream runs through as many shuffled epochs as the run needs (``train.epochs`` fixes the run
length at whole global batches of the first epoch's row count); the position in it is the loop's
``consumed_samples``, so a resume continues exactly.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from data_pipeline.readers import DataError
from posttrain.chat import ROLES, ChatTokenizer, render

IGNORE_INDEX = -100
SKIP_REASONS = ("malformed_json", "not_an_object", "missing_key", "bad_message", "no_assistant_turn",
                "bad_ranking", "longer_than_seq_length")
LOG_FIRST_SKIPPED = 5


class Skipped(ValueError):
    """A record that is skipped; ``args[0]`` is one of ``SKIP_REASONS``."""


def fingerprint(paths: list) -> list:
    """[[file name, bytes, sha256], ...]: a resume refuses changed data files."""
    out = []
    for p in paths:
        data = Path(p).read_bytes()
        out.append([Path(p).name, len(data), hashlib.sha256(data).hexdigest()])
    return out


def read_records(paths: list, parse, skipped: dict, log=None) -> list:
    """``parse(obj)`` over every non-blank line of every file -> the list of results; records it rejects with
    ``Skipped(reason)`` are counted in ``skipped`` and the first ``LOG_FIRST_SKIPPED`` logged as file:line to ``log``
    (default: the current ``sys.stderr``, looked up at the call, so a redirected or captured stderr gets them)."""
    log = log or sys.stderr
    out = []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"data.paths: {path} does not exist (posttrain reads .jsonl files)")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError:
                        raise Skipped("malformed_json") from None
                    if not isinstance(obj, dict):
                        raise Skipped("not_an_object")
                    out.extend(parse(obj))
                except Skipped as e:
                    skipped[e.args[0]] = skipped.get(e.args[0], 0) + 1
                    if sum(skipped.values()) <= LOG_FIRST_SKIPPED:
                        print(f"[posttrain] skipped {path}:{line_no}: {e.args[0]}", file=log, flush=True)
    return out


def _messages(value, default_role: str) -> list[dict]:
    """A str (one turn of ``default_role``) or a messages list -> validated messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        raise Skipped("bad_message")
    for m in value:
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise Skipped("bad_message")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_sft(obj: dict) -> list[list[dict]]:
    if "messages" not in obj:
        raise Skipped("missing_key")
    messages = _messages(obj["messages"], "user")
    if not any(m["role"] == "assistant" for m in messages):
        raise Skipped("no_assistant_turn")
    return [messages]


def parse_preference(obj: dict) -> list[tuple[list, list, list]]:
    """-> [(prompt messages, chosen messages, rejected messages), ...] (one, or the ranked form's pairs)."""
    if "prompt" not in obj:
        raise Skipped("missing_key")
    prompt = _messages(obj["prompt"], "user")
    if "responses" in obj or "ranking" in obj:
        responses, ranking = obj.get("responses"), obj.get("ranking")
        if not (isinstance(responses, list) and isinstance(ranking, list) and len(responses) == len(ranking) >= 2
                and all(isinstance(r, (int, float)) for r in ranking)):
            raise Skipped("bad_ranking")
        answers = [_messages(r, "assistant") for r in responses]
        return [(prompt, answers[i], answers[j]) for i in range(len(answers)) for j in range(len(answers))
                if ranking[i] < ranking[j]]
    if "chosen" not in obj or "rejected" not in obj:
        raise Skipped("missing_key")
    return [(prompt, _messages(obj["chosen"], "assistant"), _messages(obj["rejected"], "assistant"))]


def sequence(tok: ChatTokenizer, messages: list[dict], loss_on: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n,), labels (n,)): labels[i] = ids[i + 1] where token i + 1 is trainable, else -100."""
    ids, trainable = render(tok, messages, loss_on=loss_on)
    ids = np.asarray(ids, dtype=np.int64)
    labels = np.full_like(ids, IGNORE_INDEX)
    learn = np.asarray(trainable[1:], dtype=bool)
    labels[:-1][learn] = ids[1:][learn]
    return ids, labels


def response_sequence(tok: ChatTokenizer, prompt: list[dict], response: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``sequence`` of prompt + response with labels only on the response's assistant turns (earlier assistant turns
    of a multi-turn prompt are context). The prompt's ids are a prefix of the whole: its text ends at a role token."""
    ids, labels = sequence(tok, prompt + response, "assistant")
    num_prompt = len(render(tok, prompt)[0])
    labels[:num_prompt - 1] = IGNORE_INDEX  # label i predicts token i + 1: the response starts at num_prompt
    return ids, labels


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class _EpochRows:
    """Rows of consecutive shuffled epochs, built on demand: ``rows_of(epoch)`` -> list of row specs."""

    def __init__(self, num_rows: int):
        self.num_rows, self._epochs, self._starts = num_rows, [], [0]

    def __len__(self) -> int:
        return self.num_rows

    def _row(self, idx: int):
        if not 0 <= idx < self.num_rows:
            raise IndexError(f"row {idx} out of range: the dataset was built for {self.num_rows} rows")
        while idx >= self._starts[-1]:
            rows = self.rows_of(len(self._epochs))
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        epoch = int(np.searchsorted(self._starts, idx, side="right")) - 1
        return self._epochs[epoch][idx - self._starts[epoch]]


class SFTDataset(_EpochRows):
    """Packed conversations: ``ds[i]`` -> np.int64 (3, seq_length) = input ids, labels, document ids."""

    def __init__(self, samples: list, seq_length: int, seed: int, pad_id: int, num_rows: int):
        super().__init__(num_rows)
        self.samples, self.seq_length, self.seed, self.pad_id = samples, seq_length, seed, pad_id

    def rows_of(self, epoch: int) -> list[list[int]]:
        """Next-fit packing of the epoch's shuffled conversations: lists of sample indices per row."""
        rows, row, used = [], [], 0
        for i in _epoch_order(len(self.samples), self.seed, epoch):
            n = len(self.samples[i][0])
            if used + n > self.seq_length:
                rows.append(row)
                row, used = [], 0
            row.append(int(i))
            used += n
        return rows + [row] if row else rows

    def __getitem__(self, idx: int) -> np.ndarray:
        out = np.empty((3, self.seq_length), dtype=np.int64)
        out[0], out[1] = self.pad_id, IGNORE_INDEX
        start = 0
        for doc, i in enumerate(self._row(idx)):
            ids, labels = self.samples[i]
            out[0, start:start + len(ids)], out[1, start:start + len(ids)] = ids, labels
            out[2, start:start + len(ids)] = doc
            start += len(ids)
        out[2, start:] = len(self._row(idx))  # the padding is a document of its own
        return out


class PairDataset(_EpochRows):
    """One preference pair per row: ``ds[i]`` -> np.int64 (7, seq_length) (see the module docstring)."""

    def __init__(self, pairs: list, seq_length: int, seed: int, pad_id: int, num_rows: int):
        super().__init__(num_rows)
        self.pairs, self.seq_length, self.seed, self.pad_id = pairs, seq_length, seed, pad_id

    def rows_of(self, epoch: int) -> list[int]:
        return [int(i) for i in _epoch_order(len(self.pairs), self.seed, epoch)]

    def __getitem__(self, idx: int) -> np.ndarray:
        i = self._row(idx)
        out = np.zeros((7, self.seq_length), dtype=np.int64)
        for side, (ids, labels) in enumerate(self.pairs[i]):
            out[3 * side], out[3 * side + 1] = self.pad_id, IGNORE_INDEX
            out[3 * side, :len(ids)], out[3 * side + 1, :len(labels)] = ids, labels
            out[3 * side + 2, 0] = len(ids)
        out[6, 0] = i
        return out


def load_sft(paths: list, tok: ChatTokenizer, seq_length: int, loss_on: str, skipped: dict) -> list:
    """[(ids, labels), ...] of every valid conversation that fits in ``seq_length`` tokens."""
    samples = []
    for messages in read_records(paths, parse_sft, skipped):
        ids, labels = sequence(tok, messages, loss_on)
        if len(ids) > seq_length:
            skipped["longer_than_seq_length"] = skipped.get("longer_than_seq_length", 0) + 1
            continue
        samples.append((ids, labels))
    return samples


def load_pairs(paths: list, tok: ChatTokenizer, seq_length: int, skipped: dict) -> list:
    """[((chosen ids, labels), (rejected ids, labels)), ...]: prompt + response, loss on the response."""
    pairs = []
    for prompt, chosen, rejected in read_records(paths, parse_preference, skipped):
        sides = [response_sequence(tok, prompt, answer) for answer in (chosen, rejected)]
        if max(len(ids) for ids, _ in sides) > seq_length:
            skipped["longer_than_seq_length"] = skipped.get("longer_than_seq_length", 0) + 1
            continue
        pairs.append(tuple(sides))
    return pairs
