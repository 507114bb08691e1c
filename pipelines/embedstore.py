"""Reading an embeddings folder (`avray embed`'s OUT) for search, indexing and de-duplication.

    EMB/embeddings/<video_id>.parquet   the embedding table (pipelines/schema.py), one part per video
    EMB/_config.json                    the checkpoint that made them (path, sha1, D) and its clip settings
    EMB/_index/<version>/               made from the parts as they were (`version`: a hash of their
        rows.parquet                    names, sizes and times): clip_id, video_id, source_path, start_s,
                                        end_s, caption, in matrix order
        <column>.npy                    float32 (N, D) of one embedding column, memory-mapped by readers
        <column>.<kind>.faiss           an approximate index of it (`avray index`), + .json: its recall

A version folder is built under a temporary name and renamed into place when complete, so a reader
never sees one half-written; parts written by a running `avray embed` change the version, and the
next reader builds a new one (older versions are removed). Parts themselves are atomic (ClipStore).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schema import EMBEDDING_COLUMNS, vectors

ROW_COLUMNS = ("clip_id", "video_id", "source_path", "start_s", "end_s", "caption")


@dataclass(frozen=True)
class EmbeddingStore:
    """A local embeddings folder."""

    folder: str

    def __post_init__(self) -> None:
        if not os.path.isfile(os.path.join(self.folder, "_config.json")):
            raise FileNotFoundError(f"{self.folder} is not an embeddings folder (no _config.json; run avray embed)")

    @cached_property
    def config(self) -> dict[str, Any]:
        with open(os.path.join(self.folder, "_config.json")) as f:
            return json.load(f)

    @property
    def dim(self) -> int:
        return int(self.config["dim"])

    def parts(self) -> list[str]:
        """The finished parts, sorted (temporary files of a running embed are not parts)."""
        d = os.path.join(self.folder, "embeddings")
        names = sorted(n for n in os.listdir(d) if n.endswith(".parquet") and not n.startswith((".", "_"))) \
            if os.path.isdir(d) else []
        if not names:
            raise FileNotFoundError(f"no embeddings in {d} (run avray embed)")
        return [os.path.join(d, n) for n in names]

    def version(self, parts: list[str]) -> str:
        h = hashlib.sha1(self.config["checkpoint_sha1"].encode())
        for p in parts:
            st = os.stat(p)
            h.update(f"{os.path.basename(p)}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()[:16]

    def current(self) -> str:
        """The version folder of the parts as they are now, built first when missing."""
        parts = self.parts()
        root = os.path.join(self.folder, "_index")
        final = os.path.join(root, self.version(parts))
        if os.path.isdir(final):
            return final
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            table = pa.concat_tables([pq.read_table(p, columns=[*ROW_COLUMNS, *EMBEDDING_COLUMNS]) for p in parts])
            pq.write_table(table.select(list(ROW_COLUMNS)), os.path.join(tmp, "rows.parquet"))
            for c in EMBEDDING_COLUMNS:
                np.save(os.path.join(tmp, f"{c}.npy"), np.ascontiguousarray(vectors(table, c), np.float32))
            try:
                os.rename(tmp, final)
            except OSError:  # another reader finished the same version first
                if not os.path.isdir(final):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in os.listdir(root):  # earlier versions: their parts have changed
            if old != os.path.basename(final) and not old.startswith("."):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        return final

    def matrix(self, column: str, version: str | None = None) -> np.ndarray:
        """float32 (N, D) of an embedding column, memory-mapped."""
        if column not in EMBEDDING_COLUMNS:
            raise ValueError(f"unknown embedding column {column!r}; choose from {list(EMBEDDING_COLUMNS)}")
        return np.load(os.path.join(version or self.current(), f"{column}.npy"), mmap_mode="r")

    def rows(self, version: str | None = None) -> pa.Table:
        return pq.read_table(os.path.join(version or self.current(), "rows.parquet"))


def top_k(queries: np.ndarray, gallery: np.ndarray, k: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: queries float32 (Q, D) against gallery (N, D), in blocks of
    `block` gallery rows (memory: Q x block scores). Returns scores and indices (Q, min(k, N)),
    best first."""
    k = min(k, len(gallery))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s in range(0, len(gallery), block):
        scores = queries @ np.asarray(gallery[s:s + block]).T  # (Q, b)
        kk = min(k, scores.shape[1])
        idx = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        best_s = np.concatenate([best_s, np.take_along_axis(scores, idx, axis=1)], axis=1)
        best_i = np.concatenate([best_i, idx + s], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, axis=1), np.take_along_axis(best_i, keep, axis=1)
    return best_s, best_i
