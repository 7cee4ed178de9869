"""Fill-in-the-Middle (FIM) in PSM order, as DeepSeek-V3 applies it during pretraining (rate 0.1):

    <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <eos>

The split is at the character level (two cut points uniform over the document), and whether and where to cut
depends only on ``(seed, document index)``: the output does not depend on the number of workers or on how
documents were grouped into chunks.
"""
from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A few integer ops per document (a numpy Generator per document would cost ~30 us each).
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(h: int) -> float:
    return (h >> 11) * (1.0 / (1 << 53))


def fim_split(text: str, doc_index: int, seed: int, rate: float) -> tuple[str, str, str] | None:
    """``(prefix, middle, suffix)`` if this document gets FIM, else None."""
    if rate <= 0.0:
        return None
    h = _splitmix64((seed & _MASK64) ^ _splitmix64(doc_index))
    if _uniform(h) >= rate:
        return None
    h1 = _splitmix64(h)
    h2 = _splitmix64(h1)
    n = len(text)
    a, b = sorted((h1 % (n + 1), h2 % (n + 1)))
    return text[:a], text[a:b], text[b:]


def fim_tokens(encode, prefix: str, middle: str, suffix: str, fim_ids, eos_id: int) -> list[int]:
    """PSM token ids; each part is encoded separately so that decoding the parts gives the text back."""
    begin, hole, end = fim_ids
    return [begin, *encode(prefix), hole, *encode(suffix), end, *encode(middle), eos_id]
