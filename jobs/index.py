"""Add an approximate nearest-neighbour index (FAISS) to an embeddings folder; `avray search` then uses it.

The index is built over one embedding column (`emb` by default) of the parts as they are now, in
the folder's current version (pipelines/embedstore.py: parts written later make a new version,
which has no index until this runs again, and search falls back to exact). `hnsw` (default):
FAISS's graph index (IndexHNSWFlat, inner product; no training, fast to query); `ivf`: an inverted
file over k-means cells (IndexIVFFlat; `--nprobe` cells searched). Its recall@10 against exact
search is measured on --queries of the vectors themselves (each query's own vector left out) and
printed, with the speed of both.

example:
  avray index emb/                      # HNSW over the fused clip embeddings
  avray index emb/ --kind ivf --column audio_emb
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexConfig:
    emb: str = field(metadata={"help": "embeddings folder written by avray embed", "positional": True})
    column: str = field(default="emb", metadata={"help": "embedding column to index",
                                                 "choices": ("emb", "video_emb", "audio_emb")})
    kind: str = field(default="hnsw", metadata={"help": "hnsw (graph) or ivf (inverted file)", "choices": ("hnsw", "ivf")})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW: neighbours per node"})
    ef_search: int = field(default=256, metadata={"help": "HNSW: candidates kept while searching"})
    nlist: int = field(default=0, metadata={"help": "IVF: cells (0: 4 sqrt(N))"})
    nprobe: int = field(default=16, metadata={"help": "IVF: cells searched per query"})
    queries: int = field(default=1000, metadata={"help": "vectors used to measure recall@10 against exact search"})


def build_index(vectors, cfg: IndexConfig):
    """A FAISS inner-product index over float32 (N, D) unit vectors."""
    import faiss
    import numpy as np

    x = np.ascontiguousarray(vectors, np.float32)
    n, d = x.shape
    if cfg.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.ef_search
    else:
        nlist = cfg.nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # FAISS wants >= 39 points per cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(cfg.nprobe, nlist)
    index.add(x)
    return index


def recall_at_10(index, vectors, queries: int, seed: int = 0) -> dict[str, float]:
    """recall@10 of `index` against exact search for `queries` of the vectors (each one's own
    vector excluded from both answers), and each one's ms per query."""
    import numpy as np

    from pipelines.embedstore import top_k

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(vectors), size=min(queries, len(vectors)), replace=False)
    q = np.ascontiguousarray(vectors[pick], np.float32)
    k = min(11, len(vectors))
    t0 = time.perf_counter()
    _, exact = top_k(q, vectors, k)
    t1 = time.perf_counter()
    _, approx = index.search(q, k)
    t2 = time.perf_counter()
    hits = [len(set(e[e != p][:10]) & set(a[a != p][:10])) / max(1, len(e[e != p][:10]))
            for p, e, a in zip(pick, exact, approx)]
    return {"recall_at_10": float(np.mean(hits)), "exact_ms": (t1 - t0) * 1000 / len(q),
            "index_ms": (t2 - t1) * 1000 / len(q), "queries": int(len(q))}


def load_index(version: str, column: str) -> tuple[str, Any] | None:
    """(kind, FAISS index) of `column` in a version folder, or None when it has none."""
    found = sorted(glob.glob(os.path.join(version, f"{column}.*.faiss")))
    if not found:
        return None
    import faiss

    with open(found[-1][: -len(".faiss")] + ".json") as f:
        meta = json.load(f)
    index = faiss.read_index(found[-1])
    if meta["kind"] == "hnsw":
        index.hnsw.efSearch = meta["ef_search"]
    else:
        index.nprobe = meta["nprobe"]
    return meta["kind"], index


def run(cfg: IndexConfig) -> int:
    import faiss

    from pipelines.embedstore import EmbeddingStore

    if min(cfg.hnsw_m, cfg.ef_search, cfg.nprobe, cfg.queries) < 1 or cfg.nlist < 0:
        raise ValueError("--hnsw-m, --ef-search, --nprobe and --queries must be >= 1, --nlist >= 0")
    store = EmbeddingStore(cfg.emb)
    version = store.current()
    x = store.matrix(cfg.column, version)
    t0 = time.perf_counter()
    index = build_index(x, cfg)
    built = time.perf_counter() - t0
    quality = recall_at_10(index, x, cfg.queries)
    base = os.path.join(version, f"{cfg.column}.{cfg.kind}")
    for old in glob.glob(os.path.join(version, f"{cfg.column}.*.faiss")):  # one index per column
        os.remove(old)
    tmp = f"{base}.faiss.tmp"
    faiss.write_index(index, tmp)
    meta = {"kind": cfg.kind, "column": cfg.column, "vectors": int(len(x)), "dim": int(x.shape[1]),
            "build_seconds": round(built, 3), "hnsw_m": cfg.hnsw_m, "ef_search": cfg.ef_search,
            "nprobe": getattr(index, "nprobe", cfg.nprobe), **quality}
    with open(base + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, base + ".faiss")  # last: an index exists only with its settings beside it
    print(f"avray index: {cfg.kind} over {cfg.column} of {len(x)} clips ({x.shape[1]}-d) in {built:.1f} s; "
          f"recall@10 against exact search {quality['recall_at_10']:.3f} on {quality['queries']} queries, "
          f"{quality['index_ms']:.3f} ms per query (exact: {quality['exact_ms']:.3f} ms)")
    print(f"  {base}.faiss: avray search {cfg.emb} --text \"...\" uses it (--exact: not)")
    return 0


CONFIG = IndexConfig
