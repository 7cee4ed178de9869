"""posttrain.chat and posttrain.data: the chat template against transformers' apply_chat_template, the assistant-only
labels, preference records (plain and ranked), bad records counted by reason with file:line, packing."""
from __future__ import annotations

import io

import numpy as np
import pytest

from helpers import trained_tokenizer, write_jsonl
from posttrain.chat import ChatTokenizer, render, render_text
from posttrain.data import (IGNORE_INDEX, PairDataset, SFTDataset, load_pairs, load_sft, parse_preference,
                            read_records, sequence)

CONVERSATIONS = [
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": " 5\n"}, {"role": "user", "content": "and  x<eos> y?"},
     {"role": "assistant", "content": "def f(x):\n    return x"}],
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": ""},
     {"role": "assistant", "content": "ok"}],
]


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    from data_pipeline.tokenizer import add_chat_tokens
    return ChatTokenizer(add_chat_tokens(trained_tokenizer(500), tmp_path_factory.mktemp("tok") / "chat.model"))


def test_chat_pieces_are_appended_and_idempotent(chat_tok, tmp_path):
    from data_pipeline.tokenizer import add_chat_tokens, load_tokenizer
    base = load_tokenizer(trained_tokenizer(500))
    assert (chat_tok.user_id, chat_tok.assistant_id, chat_tok.end_of_turn_id) == (500, 501, 502)
    assert chat_tok.encode("x = 1\n") == base.encode("x = 1\n")  # existing ids do not move
    again = add_chat_tokens(chat_tok.path, tmp_path / "again.model")
    assert open(again, "rb").read() == open(chat_tok.path, "rb").read()


def test_template_matches_transformers_apply_chat_template(chat_tok, tmp_path):
    from transformers import AutoTokenizer
    from pretrain.export import save_tokenizer
    save_tokenizer(chat_tok.path, tmp_path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    for messages in CONVERSATIONS:
        for generation_prompt in (False, True):
            ids, _ = render(chat_tok, messages, add_generation_prompt=generation_prompt)
            hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else hf_ids
            assert ids == list(hf_ids)
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt) == \
                render_text(messages, generation_prompt)


def test_labels_only_on_assistant_turns(chat_tok):
    messages = CONVERSATIONS[0]
    ids, labels = sequence(chat_tok, messages, "assistant")
    # hand-built: the assistant contents and their end-of-turn token are the targets, nothing else
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            expected += chat_tok.encode(m["content"]) + [chat_tok.end_of_turn_id]
    assert [int(t) for t in labels if t != IGNORE_INDEX] == expected
    targets = np.flatnonzero(labels != IGNORE_INDEX)
    assert (labels[targets] == ids[targets + 1]).all()
    _, all_labels = sequence(chat_tok, messages, "all")
    assert (all_labels[:-1] == ids[1:]).all() and all_labels[-1] == IGNORE_INDEX


def test_bad_records_counted_by_reason_with_file_line(chat_tok, tmp_path):
    good = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}
    path = write_jsonl(str(tmp_path / "sft.jsonl"), [
        good, b"{not json", [1, 2], {"text": "x"}, {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "long " * 200}]}, good])
    skipped, log = {}, io.StringIO()
    import posttrain.data as data
    samples = [sequence(chat_tok, m, "assistant") for m in read_records([path], data.parse_sft, skipped, log)]
    assert len(samples) == 3
    assert skipped == {"malformed_json": 1, "not_an_object": 1, "missing_key": 1, "bad_message": 1,
                       "no_assistant_turn": 1}
    assert f"{path}:2: malformed_json" in log.getvalue() and f"{path}:6: no_assistant_turn" in log.getvalue()
    skipped = {}
    assert len(load_sft([path], chat_tok, 64, "assistant", skipped)) == 2
    assert skipped["longer_than_seq_length"] == 1


def test_preferences_plain_and_ranked():
    assert parse_preference({"prompt": "q", "chosen": "a", "rejected": "b"}) == [
        ([{"role": "user", "content": "q"}], [{"role": "assistant", "content": "a"}],
         [{"role": "assistant", "content": "b"}])]
    pairs = parse_preference({"prompt": "q", "responses": ["best", "mid", "worst", "tie"], "ranking": [0, 1, 2, 1]})
    names = sorted((c[0]["content"], r[0]["content"]) for _, c, r in pairs)
    assert names == sorted([("best", "mid"), ("best", "worst"), ("best", "tie"), ("mid", "worst"), ("tie", "worst")])


def test_pair_labels_only_on_the_final_response(chat_tok, tmp_path):
    prompt = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "earlier answer"},
              {"role": "user", "content": "b"}]
    path = write_jsonl(str(tmp_path / "p.jsonl"), [{"prompt": prompt, "chosen": "yes", "rejected": "no!"}])
    (chosen, chosen_labels), (rejected, rejected_labels) = load_pairs([path], chat_tok, 64, {})[0]
    assert [int(t) for t in chosen_labels if t != IGNORE_INDEX] == chat_tok.encode("yes") + [chat_tok.end_of_turn_id]
    assert [int(t) for t in rejected_labels if t != IGNORE_INDEX] == chat_tok.encode("no!") + [chat_tok.end_of_turn_id]
    ds = PairDataset([((chosen, chosen_labels), (rejected, rejected_labels))], 64, 0, chat_tok.pad_id, 3)
    row = ds[2]  # the third epoch's only row
    assert row[2, 0] == len(chosen) and row[5, 0] == len(rejected) and row[6, 0] == 0
    assert (row[0, :len(chosen)] == chosen).all() and (row[0, len(chosen):] == chat_tok.pad_id).all()


def test_sft_packing_documents_and_epochs():
    samples = [(np.arange(n) + 10 * n, np.full(n, IGNORE_INDEX)) for n in (3, 5, 4, 6, 2)]
    ds = SFTDataset(samples, seq_length=8, seed=0, pad_id=-1, num_rows=12)
    rows = [ds[i] for i in range(len(ds))]
    first_epoch = ds.rows_of(0)
    assert sorted(i for row in first_epoch for i in row) == [0, 1, 2, 3, 4]  # each conversation once per epoch
    assert ds.rows_of(1) != first_epoch  # reshuffled
    row = rows[0]
    start = 0
    for doc, i in enumerate(first_epoch[0]):
        n = len(samples[i][0])
        assert (row[0, start:start + n] == samples[i][0]).all() and (row[2, start:start + n] == doc).all()
        start += n
    assert (row[0, start:] == -1).all() and (row[1, start:] == IGNORE_INDEX).all()
    assert (row[2, start:] == len(first_epoch[0])).all()  # padding: a document of its own


def test_arithmetic_items_are_verifiable_and_held_out():
    from posttrain.arithmetic import is_correct, make
    data = make(300, 50, seed=1)
    train = {m["messages"][0]["content"] for m in data["sft"]}
    held = [it["prompt"] for it in data["heldout"]]
    assert len(train) == 300 and len(set(held)) == 50 and not train & set(held)
    for it in data["heldout"]:
        assert is_correct(it["prompt"], it["answer"]) and not is_correct(it["prompt"], it["rejected"])
    for pair in data["prefs"]:
        assert is_correct(pair["prompt"], f" {pair['chosen']}\n") and not is_correct(pair["prompt"], pair["rejected"])
