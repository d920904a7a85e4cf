"""Offline tokenizers with the released T5 and CLIP vocabulary sizes and special-token ids.

The released vocabularies cannot be downloaded, so the pieces and merges are generated from
character n-grams in a fixed order: the same ids on every run, every id below the encoder's
`vocab_size`, and any English caption tokenizes (rare characters fall back to `<unk>` for T5 and
to single bytes for CLIP, as with the released files).
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from itertools import islice, product
from typing import Any

__all__ = ["CLIP_VOCAB", "T5_VOCAB", "clip_tokenizer", "t5_tokenizer"]

# google/t5-v1_1-xxl spiece.model: 32000 pieces (<pad> 0, </s> 1, <unk> 2), then 100 sentinels
# <extra_id_99> ... <extra_id_0> at 32000 ... 32099.
T5_PIECES, T5_EXTRA_IDS = 32000, 100
T5_VOCAB = T5_PIECES + T5_EXTRA_IDS
# openai/clip-vit-large-patch14 vocab.json: 256 bytes, 256 bytes + "</w>", 48894 merges,
# <|startoftext|> 49406, <|endoftext|> 49407.
CLIP_VOCAB = 49408
_CLIP_MERGES = CLIP_VOCAB - 2 * 256 - 2

_LOWER = string.ascii_lowercase


def _ngrams(n: int) -> Iterator[str]:
    """Every lowercase n-gram, in lexicographic order."""
    return ("".join(chars) for chars in product(_LOWER, repeat=n))


def _t5_pieces() -> list[str]:
    """31997 word pieces: "▁", printable characters and lowercase bi- and trigrams, alone and word-initial."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = ["▁", *chars, *("▁" + c for c in chars)]
    for n in (2, 3):
        pieces += [*_ngrams(n), *("▁" + g for g in _ngrams(n))]
    return pieces[: T5_PIECES - 3]


def t5_tokenizer(model_max_length: int) -> Any:
    """A T5 Unigram tokenizer of 32100 tokens laid out as the released one."""
    from transformers import T5Tokenizer

    # Scores fall with the index so that Viterbi prefers fewer, longer pieces and ties break the same way.
    pieces = _t5_pieces()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -10.0 - i / len(pieces)) for i, piece in enumerate(pieces)]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    return T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=model_max_length)


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table in CLIP's vocab.json order: printable bytes first, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def _clip_merges() -> Iterator[tuple[str, str]]:
    """Merges that build lowercase n-grams left to right, inside and at the end of a word."""
    for n in (2, 3, 4):
        for gram in _ngrams(n):
            yield gram[:-1], gram[-1]
            yield gram[:-1], gram[-1] + "</w>"


def clip_tokenizer(model_max_length: int, pad_token: str) -> Any:
    """A CLIP byte-level BPE tokenizer of 49408 tokens laid out as the released one."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(b + "</w>" for b in alphabet)]
    merges = list(islice(_clip_merges(), _CLIP_MERGES))
    tokens += ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)
