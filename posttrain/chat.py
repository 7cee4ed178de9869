"""The chat format: DeepSeek-style role and turn tokens added to our sentencepiece tokenizer, one renderer, and the
same template for transformers (``chat_template``).

    <system text><｜User｜>question<｜Assistant｜>answer<｜end_of_turn｜><｜User｜>...

As in DeepSeek's template the system prompt opens the conversation as plain text, each user turn follows
``<｜User｜>``, each assistant turn follows ``<｜Assistant｜>`` and ends with an end-of-turn token (DeepSeek uses its
end-of-sentence token there; ours is a separate piece, so a pretraining ``<eos>`` keeps its meaning and generation
stops on the turn end). The three pieces are appended to the sentencepiece model as *user-defined* pieces: atomic in
both sentencepiece and transformers (``AddedToken``), so transformers' ``apply_chat_template`` tokenizes the rendered
string to exactly the ids :func:`render` builds (tests/test_posttrain_chat.py). Like DeepSeek's own tokenizer, a
message that contains the literal string of a role token is tokenized to that token.

Training targets: with ``train.loss_on=assistant`` only the assistant turns' content and their end-of-turn token
are learned (``<｜Assistant｜>`` is part of the prompt); with ``all`` every token after the first.
"""
from __future__ import annotations

import os

from data_pipeline.tokenizer import ASSISTANT, CHAT_TEMPLATE, CHAT_TOKENS, END_OF_TURN, USER, add_chat_tokens  # noqa: F401

ROLES = ("system", "user", "assistant")


class ChatTokenizer:
    """``data_pipeline.tokenizer.Tokenizer`` of a model with the chat pieces, plus their ids."""

    def __init__(self, path: str | os.PathLike):
        from data_pipeline.tokenizer import load_tokenizer

        self.tok = load_tokenizer(str(path))
        ids = [self.tok.sp.piece_to_id(p) for p in CHAT_TOKENS]
        if any(self.tok.id_to_piece(i) != p for i, p in zip(ids, CHAT_TOKENS)):
            raise ValueError(f"{path} has no chat pieces; pass it through posttrain.chat.add_chat_tokens first")
        self.user_id, self.assistant_id, self.end_of_turn_id = ids
        self.vocab_size, self.path, self.pad_id = self.tok.vocab_size, self.tok.path, self.tok.pad_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids) -> str:
        """Text of ids; ids past the tokenizer (the model's vocabulary padding rows, which a barely trained model
        can sample) decode to nothing."""
        return self.tok.decode([i for i in ids if i < self.vocab_size])


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly what ``CHAT_TEMPLATE`` renders."""
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        out.append(content if role == "system" else USER + content if role == "user"
                   else ASSISTANT + content + END_OF_TURN)
    return "".join(out) + (ASSISTANT if add_generation_prompt else "")


def render(tok: ChatTokenizer, messages: list[dict], add_generation_prompt: bool = False,
           loss_on: str = "assistant") -> tuple[list[int], list[bool]]:
    """(token ids, trainable flag per token) of a conversation. Trainable: the assistant turns' content and their
    end-of-turn token (``loss_on="assistant"``), or every token (``"all"``). Text runs between role tokens are
    encoded whole, as transformers does after splitting at its added tokens, so the ids equal
    ``apply_chat_template``'s."""
    ids, trainable = [], []
    text, text_trainable = "", False

    def flush() -> None:
        nonlocal text
        if text:
            piece = tok.encode(text)
            ids.extend(piece)
            trainable.extend([text_trainable] * len(piece))
        text = ""

    def token(idx: int, learn: bool) -> None:
        flush()
        ids.append(idx)
        trainable.append(learn)

    for m in messages:
        role, content = m["role"], m["content"]
        if role == "system":
            text += content
        elif role == "user":
            token(tok.user_id, False)
            text += content
        else:
            token(tok.assistant_id, False)
            text, text_trainable = content, True
            token(tok.end_of_turn_id, True)
            text_trainable = False
    flush()
    if add_generation_prompt:
        token(tok.assistant_id, False)
    if loss_on == "all":
        trainable = [True] * len(ids)
    return ids, trainable
