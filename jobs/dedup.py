"""Find near-duplicate clips in an embeddings folder: pairs above a cosine threshold, and their groups.

Every clip is compared with every clip of another video (exact, in blocks: memory is a block of
scores). By default (`--column both`) a pair's score is the lower of its picture similarity
(`video_emb`) and its sound similarity (`audio_emb`): a duplicate looks *and* sounds alike. On the
fused `emb` alone, two different videos' silent stretches (identical sound, so identical audio
vectors) pair up whenever their pictures are merely similar; under `both` two silent stretches
still pair when their pictures alone score above the threshold. Writes a Parquet table of the pairs
(clip, video, source path and start of both, their score) whose `group` is the connected component
of the videos the pairs join, so copies of a video (re-encoded, re-cut, shifted in time) land in
one group; prints the groups. Clips of one video are not compared with each other (their
neighbours in time look alike).

example:
  avray dedup emb/ --threshold 0.9 --out dups.parquet
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DedupConfig:
    emb: str = field(metadata={"help": "embeddings folder written by avray embed", "positional": True})
    threshold: float = field(default=0.9, metadata={"help": "cosine similarity at or above which two clips are duplicates"})
    out: str = field(default="duplicates.parquet", metadata={"help": "Parquet table of the duplicate pairs", "short": "-o"})
    column: str = field(default="both", metadata={
        "help": "what is compared: both (the lower of the video_emb and the audio_emb cosine) or one embedding column",
        "choices": ("both", "emb", "video_emb", "audio_emb")})
    block: int = field(default=4096, metadata={"help": "clips compared per block"})


def duplicate_pairs(matrices, videos, threshold: float, block: int = 4096):
    """(i, j, score) arrays of every pair i < j of rows from different `videos` (N,) whose score is
    >= threshold: the lowest inner product of the two rows over `matrices` (one or more float32
    (N, D) arrays of unit vectors, e.g. the video and the audio embeddings)."""
    import numpy as np

    videos = np.asarray(videos)
    matrices = [np.asarray(m) for m in matrices]
    I, J, S = [], [], []
    for s in range(0, len(videos), block):
        scores = matrices[0][s:s + block] @ matrices[0].T  # (b, N): one block of scores in memory
        for m in matrices[1:]:
            np.minimum(scores, m[s:s + block] @ m.T, out=scores)
        i, j = np.nonzero(scores >= threshold)
        i = i + s
        keep = (i < j) & (videos[i] != videos[j])
        I.append(i[keep])
        J.append(j[keep])
        S.append(scores[i[keep] - s, j[keep]])
    return np.concatenate(I), np.concatenate(J), np.concatenate(S).astype(np.float32)


def groups(pairs: list[tuple[str, str]]) -> dict[str, int]:
    """Union-find over video pairs: video -> the number of its connected component (0, 1, ... in
    order of each component's smallest video id)."""
    parent: dict[str, str] = {}

    def find(v: str) -> str:
        parent.setdefault(v, v)
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = sorted({find(v) for v in parent})
    number = {r: n for n, r in enumerate(roots)}
    return {v: number[find(v)] for v in parent}


def run(cfg: DedupConfig) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.embedstore import EmbeddingStore

    if not -1.0 <= cfg.threshold <= 1.0:
        raise ValueError(f"--threshold is a cosine similarity in [-1, 1], got {cfg.threshold}")
    if cfg.block < 1:
        raise ValueError("--block must be >= 1")
    store = EmbeddingStore(cfg.emb)
    version = store.current()
    columns = ("video_emb", "audio_emb") if cfg.column == "both" else (cfg.column,)
    rows = store.rows(version)
    videos = rows.column("video_id").to_numpy(zero_copy_only=False)
    i, j, s = duplicate_pairs([store.matrix(c, version) for c in columns], videos, cfg.threshold, cfg.block)
    group = groups(list(zip(videos[i].tolist(), videos[j].tolist())))
    a, b = rows.take(pa.array(i)), rows.take(pa.array(j))
    table = pa.table({
        "group": pa.array([group[v] for v in videos[i].tolist()], pa.int32()),
        "score": pa.array(s, pa.float32()),
        **{f"{c}_a": a.column(c) for c in ("clip_id", "video_id", "source_path", "start_s")},
        **{f"{c}_b": b.column(c) for c in ("clip_id", "video_id", "source_path", "start_s")},
    }).sort_by([("group", "ascending"), ("score", "descending")])
    pq.write_table(table, cfg.out)
    members: dict[int, set[str]] = {}
    for v, g in group.items():
        members.setdefault(g, set()).add(v)
    paths = dict(zip(rows.column("video_id").to_pylist(), rows.column("source_path").to_pylist()))
    print(f"avray dedup: {table.num_rows} pair(s) of clips at cosine >= {cfg.threshold:g} ({' and '.join(columns)}), "
          f"{len(members)} group(s) of near-duplicate videos among {len(set(videos.tolist()))} videos -> {cfg.out}")
    for g in sorted(members)[:20]:
        print(f"  group {g}: " + ", ".join(sorted(paths[v] for v in members[g])))
    if len(members) > 20:
        print(f"  ... and {len(members) - 20} more")
    return 0


CONFIG = DedupConfig
