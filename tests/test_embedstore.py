"""The embeddings folder as search reads it: exact top-k against a brute-force sort, versions that
follow the parts (never half-written), and the plain-Parquet vectors."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.embedstore import EmbeddingStore, top_k
from pipelines.schema import embedding_schema, vectors

D = 8


def _part(folder, vid: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, D)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    schema = embedding_schema(D)
    cols = {"clip_id": [f"{vid}-{i:05d}" for i in range(n)], "video_id": [vid] * n, "source_path": [f"/v/{vid}.mp4"] * n,
            "clip_index": list(range(n)), "start_s": [2.0 * i for i in range(n)], "end_s": [2.0 * i + 2 for i in range(n)],
            "caption": [None] * n}
    for c in ("video_emb", "audio_emb", "emb"):
        cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), D)
    (folder / "embeddings").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), folder / "embeddings" / f"{vid}.parquet")
    return v


@pytest.fixture
def emb(tmp_path):
    (tmp_path / "_config.json").write_text(json.dumps({"checkpoint": "x.pt", "checkpoint_sha1": "ab", "dim": D}))
    a, b = _part(tmp_path, "aaaa", 5, 0), _part(tmp_path, "bbbb", 3, 1)
    return tmp_path, np.concatenate([a, b])


def test_top_k_equals_a_full_sort_in_any_block_size():
    rng = np.random.default_rng(2)
    x, q = rng.standard_normal((101, D)).astype(np.float32), rng.standard_normal((4, D)).astype(np.float32)
    order = np.argsort(-(q @ x.T), axis=1)[:, :7]
    for block in (1, 10, 64, 1000):
        s, i = top_k(q, x, 7, block)
        assert i.tolist() == order.tolist()
        np.testing.assert_allclose(s, np.take_along_axis(q @ x.T, order, axis=1), rtol=1e-6)
    s, i = top_k(q, x[:3], 7)
    assert i.shape == (4, 3)  # k capped at N


def test_versions_follow_the_parts(emb):
    folder, v = emb
    store = EmbeddingStore(str(folder))
    first = store.current()
    assert store.current() == first  # unchanged parts: the same version, not rebuilt
    np.testing.assert_array_equal(store.matrix("emb", first), v)
    assert isinstance(store.matrix("emb", first), np.memmap)
    assert store.rows(first).column("clip_id").to_pylist()[5:] == ["bbbb-00000", "bbbb-00001", "bbbb-00002"]
    (folder / "embeddings" / ".tmp-cccc-1234.parquet").write_bytes(b"half")  # a running avray embed
    assert store.current() == first  # a temporary file is not a part
    _part(folder, "cccc", 2, 3)
    second = store.current()
    assert second != first and len(store.matrix("emb", second)) == 10
    assert sorted(p.name for p in (folder / "_index").iterdir()) == [second.rsplit("/", 1)[1]]  # the old one is gone
    with pytest.raises(ValueError, match="unknown embedding column"):
        store.matrix("text")


def test_vectors_read_as_plain_arrays(emb):
    folder, v = emb
    t = pq.read_table(folder / "embeddings")
    np.testing.assert_array_equal(vectors(t, "emb"), v)
    assert t.schema.field("emb").type == pa.list_(pa.float32(), D)
    with pytest.raises(FileNotFoundError, match="not an embeddings folder"):
        EmbeddingStore(str(folder / "embeddings"))
