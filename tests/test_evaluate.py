"""avray evaluate's batching: full batches across files (one file holds one video's clips)."""
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.evaluate import EvaluateConfig, _batches


def _clips(tmp_path, videos: int = 5, per_video: int = 2):
    for v in range(videos):
        ids = [f"{v:08x}"] * per_video
        pq.write_table(pa.table({"video_id": ids, "start_s": [2.0 * k for k in range(per_video)],
                                 "audio": [bytes([v, k]) for k in range(per_video)]}), tmp_path / f"{v}.parquet")
    return tmp_path


def test_batches_span_files_and_keep_every_row_once(tmp_path):
    data = _clips(tmp_path)
    cfg = EvaluateConfig(task="separation", checkpoint="-", data=str(data), out="-", batch_size=4)
    batches = list(_batches(cfg, ["video_id", "audio", "missing_column"]))
    assert [len(b["video_id"]) for b in batches] == [4, 4, 2]
    assert len(set(batches[0]["video_id"])) == 2  # two videos in one batch, not one file per batch
    rows = [(v, bytes(a)) for b in batches for v, a in zip(b["video_id"], b["audio"])]
    assert len(rows) == 10 and len(set(rows)) == 10
    # tensor columns come as read-only views of the table's buffers (pipelines.schema.numpy_batch)
    assert isinstance(batches[0]["audio"][0], memoryview) and batches[0]["audio"][0].readonly
    assert bytes(batches[0]["audio"][0]) == bytes([0, 0]) and set(batches[0]) == {"video_id", "audio"}


def test_batches_limit(tmp_path):
    data = _clips(tmp_path)
    cfg = EvaluateConfig(task="separation", checkpoint="-", data=str(data), out="-", batch_size=4, limit=7)
    assert [len(b["video_id"]) for b in _batches(cfg, ["video_id"])] == [4, 3]
