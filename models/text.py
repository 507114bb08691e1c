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


def skipgram_vectors(captions: Iterable[str], vocab: tuple[str, ...], dim: int, *, epochs: int = 20,
                     window: int = 5, seed: int = 0) -> tuple[tuple[float, ...], ...]:
    """Skip-gram word2vec (gensim, negative sampling, one worker: deterministic for a seed) over
    the tokenized captions -> one vector of `dim` per word of `vocab`, rows in vocab order, scaled
    centred per dimension and scaled to a standard deviation of 1 (as nn.Embedding's
    initialisation). The SPECIALS' rows, and those
    of words absent from `captions`, are left to the model's random initialisation: all zeros here."""
    import zlib

    import numpy as np
    from gensim.models import Word2Vec

    sentences = [tokenize(c) for c in captions]
    sentences = [s for s in sentences if s]
    if not sentences:
        raise ValueError("skip-gram needs at least one caption with a word")
    w2v = Word2Vec(sentences, vector_size=dim, window=window, min_count=1, sg=1, negative=5, epochs=epochs,
                   workers=1, seed=seed, hashfxn=lambda w: zlib.crc32(w.encode()))
    out = np.zeros((len(vocab), dim), np.float64)
    known = [i for i, w in enumerate(vocab) if i >= len(SPECIALS) and w in w2v.wv.key_to_index]
    if known:
        vecs = np.stack([w2v.wv[vocab[i]] for i in known]).astype(np.float64)
        vecs -= vecs.mean(axis=0)  # centred per dimension, then one scale for all
        out[known] = vecs / max(float(vecs.std()), 1e-12)
    return tuple(tuple(float(round(x, 6)) for x in row) for row in out)
