"""Words <-> ids for the models that read or write text (captioning, retrieval): a vocabulary
fitted on training captions (stored in the model's config, so a checkpoint carries its words),
special tokens first.
"""

from __future__ import annotations

import functools
import string
from collections import Counter
from typing import Iterable, Sequence

import torch

SPECIALS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def tokenize(text: str) -> list[str]:
    """Lower-case, split on whitespace, strip punctuation at both ends of each word, drop empties."""
    words = (w.strip(string.punctuation) for w in text.lower().split())
    return [w for w in words if w]


def build_vocab(captions: Iterable[str], min_count: int = 1) -> tuple[str, ...]:
    """SPECIALS + every word seen >= min_count times, by descending count then alphabetically."""
    counts = Counter(w for c in captions for w in tokenize(c))
    words = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIALS),
                   key=lambda w: (-counts[w], w))
    return SPECIALS + tuple(words)


@functools.lru_cache(maxsize=16)
def _index(vocab: tuple[str, ...]) -> dict[str, int]:
    return {w: i for i, w in enumerate(vocab)}


def encode(caption: str, vocab: tuple[str, ...], max_len: int) -> list[int]:
    """Caption -> [BOS, word ids..., EOS] of at most `max_len` ids (words truncated; UNK for unknown)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (room for <bos> and <eos>), got {max_len}")
    index = _index(tuple(vocab))
    return [BOS] + [index.get(w, UNK) for w in tokenize(caption)][: max_len - 2] + [EOS]


def encode_batch(captions: Sequence[str], vocab: tuple[str, ...], max_len: int) -> torch.Tensor:
    """Captions -> long (B, L) of `encode` rows right-padded with PAD, L = the longest row.
    Teacher forcing uses `ids[:, :-1]` as decoder input and `ids[:, 1:]` as targets."""
    rows = [encode(c, vocab, max_len) for c in captions]
    out = torch.full((len(rows), max(map(len, rows), default=2)), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r)
    return out


def decode(ids: Sequence[int] | torch.Tensor, vocab: tuple[str, ...]) -> str:
    """Word ids (1-D) -> space-joined words; stops at the first EOS and skips the special tokens."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    words = []
    for i in ids:
        if i == EOS:
            break
        if i >= len(SPECIALS):
            words.append(vocab[i])
    return " ".join(words)
