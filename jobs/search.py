"""Search an embeddings folder (`avray embed`'s OUT) by text, by sound or by an example video.

The query is embedded by the checkpoint that made the folder (its path and sha1 are in
EMB/_config.json; --checkpoint names it when it has moved, and must be the same file) and ranked
against every clip's embedding: `emb` (picture and sound fused) by default, `video_emb` or
`audio_emb` with --against. Exact search by default, a matrix product over the memory-mapped
vectors (pipelines/embedstore.py); with an approximate index made by `avray index` for that
column, that index (--exact: exact anyway). A media query is cut into clips as the training clips
were; their embeddings are averaged. Prints one line per clip found: rank, score, where it is
(source path, start-end seconds), its caption when known; --json prints them as JSON.

example:
  avray search emb/ --text "a red circle on the left hums" -k 5
  avray search emb/ --audio hum.wav --against audio_emb
  avray search emb/ --video query.mp4 --json
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LIMITS = {"max_pixels": 3840 * 2160, "max_seconds": 600.0}  # query media


@dataclass(frozen=True)
class SearchConfig:
    emb: str = field(metadata={"help": "embeddings folder written by avray embed", "positional": True})
    text: str | None = field(default=None, metadata={"help": "query in words"})
    audio: str | None = field(default=None, metadata={"help": "query by the sound of this audio or video file"})
    video: str | None = field(default=None, metadata={"help": "query by this video file (picture and sound)"})
    k: int = field(default=10, metadata={"help": "clips to return", "short": "-k"})
    against: str = field(default="emb", metadata={"help": "which embedding of the clips to rank",
                                                  "choices": ("emb", "video_emb", "audio_emb")})
    exact: bool = field(default=False, metadata={"help": "exact search even when an approximate index exists"})
    checkpoint: str | None = field(default=None, metadata={"help": "the checkpoint that made EMB (default: the path in EMB/_config.json)"})
    json: bool = field(default=False, metadata={"help": "print the results as JSON"})


def checkpoint_of(store, path: str | None) -> str:
    """The checkpoint that made `store`'s embeddings: `path` or the one recorded, checked by sha1."""
    from jobs.embed import checkpoint_id

    path = path or store.config["checkpoint"]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (name the one that made {store.folder} with --checkpoint)")
    if checkpoint_id(path) != store.config["checkpoint_sha1"]:
        raise ValueError(f"{path} is not the checkpoint that made {store.folder} "
                         f"({store.config['checkpoint']}, sha1 {store.config['checkpoint_sha1'][:12]}): its embeddings "
                         "would not be comparable")
    return path


def query_vector(checkpoint: str, text: str | None = None, media: str | None = None, sound_only: bool = False):
    """The query embedding float32 (D,), unit norm: of `text`, or of the clips of the `media` file
    (their mean: the fused clip embedding, the picture's when it has no sound, the sound's with
    `sound_only` or when it has no picture). Raises RequestError for a text the model cannot
    embed and for unusable media."""
    import numpy as np
    import torch

    from jobs.tasks import load_checkpoint, served_config

    task, cfg, settings = served_config(checkpoint, task="retrieval")
    model, _ = load_checkpoint(checkpoint)
    data = None
    if media is not None:
        with open(media, "rb") as f:
            data = f.read()
    item, meta = task.from_upload(data, cfg, settings, options={"text": text}, **LIMITS)
    res = task.infer(model, [item], torch.device("cpu"))[0]
    if text is not None:
        for w in meta["unknown_words"]:
            log.warning("the model does not know the word %r (it is left out of the query)", w)
        return res["text"][0]
    key = "audio" if sound_only or not meta["pictures"] else ("clip" if meta["sound"] else "video")
    v = res[key].mean(axis=0)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


def search(store, query, k: int, against: str, exact: bool) -> tuple[list[dict[str, Any]], str]:
    """The k best clips for a query vector (D,): one dict per clip (rank, score, clip_id, video_id,
    source_path, start_s, end_s, caption) and how they were found ("exact" or the index's kind)."""
    import numpy as np

    from jobs.index import load_index
    from pipelines.embedstore import top_k

    if query.shape != (store.dim,):
        raise ValueError(f"query of dimension {query.shape} against {store.dim}-d embeddings")
    version = store.current()
    index = None if exact else load_index(version, against)
    if index is not None:
        scores, idx = index[1].search(query[None].astype(np.float32), k)
        how = index[0]
    else:
        scores, idx = top_k(query[None].astype(np.float32), store.matrix(against, version), k)
        how = "exact"
    rows = store.rows(version)
    keep = idx[0] >= 0  # FAISS pads with -1 when fewer than k are found
    picked = rows.take(idx[0][keep]).to_pylist()
    return [{"rank": r + 1, "score": round(float(s), 4), **row}
            for r, (s, row) in enumerate(zip(scores[0][keep], picked))], how


def run(cfg: SearchConfig) -> int:
    from pipelines.embedstore import EmbeddingStore

    given = [q for q in (cfg.text, cfg.audio, cfg.video) if q is not None]
    if len(given) != 1:
        raise ValueError("give one query: --text, --audio or --video")
    if cfg.k < 1:
        raise ValueError("-k must be >= 1")
    for path in (cfg.audio, cfg.video):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"no such file: {path}")
    store = EmbeddingStore(cfg.emb)
    checkpoint = checkpoint_of(store, cfg.checkpoint)
    from jobs.tasks.base import RequestError
    try:
        q = query_vector(checkpoint, text=cfg.text, media=cfg.audio or cfg.video, sound_only=cfg.audio is not None)
    except RequestError as e:
        raise ValueError(e.message) from e
    t0 = time.perf_counter()
    found, how = search(store, q, cfg.k, cfg.against, cfg.exact)
    ms = (time.perf_counter() - t0) * 1000
    if cfg.json:
        print(json.dumps({"query": cfg.text or cfg.audio or cfg.video, "against": cfg.against, "search": how,
                          "ms": round(ms, 2), "clips": found}, indent=2))
        return 0
    print(f"avray search: {len(found)} clip(s) of {cfg.emb} for {cfg.text or cfg.audio or cfg.video!r} "
          f"({how} search over {cfg.against}, {ms:.1f} ms)")
    for r in found:
        caption = f"  \"{r['caption']}\"" if r["caption"] else ""
        print(f"  {r['rank']:3d}  {r['score']:.3f}  {r['source_path']}  {r['start_s']:.2f}-{r['end_s']:.2f} s{caption}")
    return 0


CONFIG = SearchConfig
