"""The training data layer: the split by video, Ray Data reading of split files, shuffled
batches, read-ahead, the idle-worker setting, and plain numpy batches (avray evaluate,
benchmarks): full batches across files (one file holds one video's clips), a filter, a limit."""
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.data import is_validation, keep_idle_workers, numpy_batches, validation_videos


def _clips(tmp_path, videos: int = 5, per_video: int = 2):
    for v in range(videos):
        ids = [f"{v:08x}"] * per_video
        pq.write_table(pa.table({"video_id": ids, "start_s": [2.0 * k for k in range(per_video)],
                                 "audio": [bytes([v, k]) for k in range(per_video)]}), tmp_path / f"{v}.parquet")
    return tmp_path


def test_batches_span_files_and_keep_every_row_once(tmp_path):
    data = _clips(tmp_path)
    batches = list(numpy_batches(str(data), ["video_id", "audio", "missing_column"], 4))
    assert [len(b["video_id"]) for b in batches] == [4, 4, 2]
    assert len(set(batches[0]["video_id"])) == 2  # two videos in one batch, not one file per batch
    rows = [(v, bytes(a)) for b in batches for v, a in zip(b["video_id"], b["audio"])]
    assert len(rows) == 10 and len(set(rows)) == 10
    # tensor columns come as read-only views of the table's buffers (pipelines.schema.numpy_batch)
    assert isinstance(batches[0]["audio"][0], memoryview) and batches[0]["audio"][0].readonly
    assert bytes(batches[0]["audio"][0]) == bytes([0, 0]) and set(batches[0]) == {"video_id", "audio"}


def test_batches_limit_filter_and_drop_last(tmp_path):
    data = str(_clips(tmp_path))
    assert [len(b["video_id"]) for b in numpy_batches(data, ["video_id"], 4, limit=7)] == [4, 3]
    assert [len(b["video_id"]) for b in numpy_batches(data, ["video_id"], 4, drop_last=True)] == [4, 4]
    kept = list(numpy_batches(data, ["video_id"], 3, filter=pc.field("video_id").isin(["00000001", "00000003"])))
    assert [b["video_id"].tolist() for b in kept] == [["00000001", "00000001", "00000003"], ["00000003"]]


def test_keep_idle_workers_allows_twice_the_cpus_unless_set(monkeypatch):
    """avray train's training and validation pipelines leave up to ~2 x CPUs read workers idle at an
    epoch's end; Ray would kill those above the CPU count (measured: 33 instead of 110 clips/s on a
    16-CPU GPU node). A limit the user set is kept."""
    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    keep_idle_workers()
    assert os.environ["RAY_num_workers_soft_limit"] == "32"
    monkeypatch.delenv("RAY_num_workers_soft_limit")
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    keep_idle_workers()
    assert os.environ["RAY_num_workers_soft_limit"] == "4"
    monkeypatch.setenv("RAY_num_workers_soft_limit", "7")
    keep_idle_workers()
    assert os.environ["RAY_num_workers_soft_limit"] == "7"


def test_split_by_video_is_deterministic():
    import pyarrow as pa
    ids = [f"{-(-i * 2**32 // 1000):08x}00000000" for i in range(1000)]  # fractions >= i / 1000
    val = [v for v in ids if is_validation(v, 0.1)]
    assert val == ids[:100]
    assert validation_videos(pa.array(ids * 3), 0.1).to_pylist() == ids[:100]  # clips of a video: once
    # a small dataset whose hashes all miss the fraction still holds one video out, and never all
    assert validation_videos(pa.array(["f0000000aa", "e0000000bb"]), 0.1).to_pylist() == ["e0000000bb"]
    assert validation_videos(pa.array(["00000000aa", "00000001bb"]), 0.9).to_pylist() == ["00000000aa"]
    # the segments of one file (ids sharing its 8-digit prefix) stay on one side in every branch
    segs = ["00000001aaaaaaaa", "00000001bbbbbbbb", "f0000000cccccccc"]
    assert validation_videos(pa.array(segs), 0.0).to_pylist() == segs[:2]  # fallback: the smallest file
    assert validation_videos(pa.array(segs), 1.0).to_pylist() == segs[:2]  # never all: the last file trains
    assert validation_videos(pa.array(segs[1:]), 0.5).to_pylist() == ["00000001bbbbbbbb"]
    for one_file in (["00000000aa"], ["00000000aa", "00000000bb"]):
        with pytest.raises(ValueError, match="need clips of at least 2 video files to hold some out, got 1"):
            validation_videos(pa.array(one_file), 0.5)


def test_a_split_reads_parts_written_before_a_column_existed(tmp_path):
    """A folder that preprocess added new parts to (with `resize`) after old ones (without): every
    group of files is read with the store's schema, so an old part gives nulls, whichever comes first."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from jobs.data import split_store

    pq.write_table(pa.table({"video_id": ["bb", "bb"], "x": [0, 1], "resize": ["crop", "crop"]}), tmp_path / "bb.parquet")
    pq.write_table(pa.table({"video_id": ["aa"], "x": [2]}), tmp_path / "aa.parquet")  # older: no resize
    ds = pads.dataset([str(tmp_path / "bb.parquet"), str(tmp_path / "aa.parquet")], format="parquet")
    ids = ds.to_table(columns=["video_id", "__filename"])
    train, _ = split_store(ids, pa.array(["bb"]), schema=ds.schema)
    assert train.read(["video_id", "resize"]).to_pylist() == [{"video_id": "aa", "resize": None}]
    with pytest.raises(pa.ArrowInvalid, match="resize"):  # what a group starting with the old part did
        split_store(ids, pa.array(["bb"]))[0].read(["video_id", "resize"])


@pytest.mark.slow
def test_split_reads_only_each_splits_files_when_files_hold_one_video(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from jobs.data import clip_dataset, split_store

    one, mixed = tmp_path / "one", tmp_path / "mixed"
    one.mkdir()
    mixed.mkdir()
    for v, n in (("aa", 3), ("bb", 2), ("cc", 4)):
        pq.write_table(pa.table({"video_id": [v] * n, "x": list(range(n))}), one / f"{v}.parquet")
    pq.write_table(pa.table({"video_id": ["aa", "aa", "bb"], "x": [0, 1, 2]}), mixed / "p0.parquet")
    pq.write_table(pa.table({"video_id": ["cc"] * 4, "x": [0, 1, 2, 3]}), mixed / "p1.parquet")
    val = pa.array(["bb"])
    for folder in (one, mixed):
        ids = pads.dataset(str(folder), format="parquet").to_table(columns=["video_id", "__filename"])
        train, valid = split_store(ids, val)
        assert (train.rows, valid.rows) == ((7, 2) if folder == one else (6, 1))
        assert (train.val_ids is None) == (folder == one)  # rows are filtered only where files mix both sides
        for rows_per_task in (1, 3, 100):  # each Ray Data task reads a group of files of about that many rows
            ds = clip_dataset(train, ["video_id", "x"], rows_per_task=rows_per_task)
            assert sorted((r["video_id"], r["x"]) for r in ds.take_all()) == (
                [("aa", i) for i in range(3 if folder == one else 2)] + [("cc", i) for i in range(4)])
        assert [(r["video_id"], r["x"]) for r in clip_dataset(valid, ["video_id", "x"]).take_all()] == (
            [("bb", 0), ("bb", 1)] if folder == one else [("bb", 2)])
    # one video per file: validation never opens a training file (they are junk now and it still reads)
    ids = pads.dataset(str(one), format="parquet").to_table(columns=["video_id", "__filename"])
    train, valid = split_store(ids, val)
    assert [Path(f).name for f in train.files] == ["aa.parquet", "cc.parquet"] and train.file_rows == (3, 4)
    for v in ("aa", "cc"):
        (one / f"{v}.parquet").write_bytes(b"not parquet")
    assert [r["x"] for r in clip_dataset(valid, ["video_id", "x"]).take_all()] == [0, 1]


@pytest.mark.slow
def test_shuffle_redraws_batches_every_epoch(ray_local, tmp_path):
    """--shuffle: every training batch is drawn from a buffer of SHUFFLE_BATCHES batches' rows, a
    new draw each epoch; without it, file order and the same batches every epoch."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import ray.data

    from jobs.data import SHUFFLE_BATCHES, clip_dataset, split_store, torch_batches

    for i in range(24):
        pq.write_table(pa.table({"video_id": [f"v{i:02d}"], "x": [i]}), tmp_path / f"v{i:02d}.parquet")
    ids = pads.dataset(str(tmp_path), format="parquet").to_table(columns=["video_id", "__filename"])
    train, _ = split_store(ids, pa.array(["none"]))
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # completion order would reorder unshuffled rows too
    try:
        numbers = clip_dataset(train, ["x"], rows_per_task=1)  # after the setting: a dataset keeps its context
        def epoch(shuffle: bool) -> list[list[int]]:
            return [b["x"].tolist() for b in torch_batches(numbers, 4, train=True, shuffle=shuffle)]

        assert epoch(False) == [list(range(i, i + 4)) for i in range(0, 24, 4)]
        first, second = epoch(True), epoch(True)
        assert SHUFFLE_BATCHES * 4 > 24  # the buffer holds every row here: any row can join any batch
        for batches in (first, second):
            assert [len(b) for b in batches] == [4] * 6 and sorted(sum(batches, [])) == list(range(24))
        assert first != second and first != epoch(False)
    finally:
        ctx.execution_options.preserve_order = before


def test_shuffled_batches_draw_from_a_bounded_buffer():
    """shuffled_batches: batches of batch_size rows, each row at most once, the partial rest
    dropped; the first batch only from the first buffer_rows rows; rows stay whole (every column
    from the same row); the generator decides the draw."""
    import torch

    from jobs.data import shuffled_batches

    incoming = [{"x": torch.arange(i, min(i + 5, 23)), "y": torch.arange(i, min(i + 5, 23))[:, None] * 10.0}
                for i in range(0, 23, 5)]  # 23 rows in batches of 5, 5, 5, 5, 3

    def draw(seed: int) -> list[list[int]]:
        out = list(shuffled_batches(incoming, 4, 10, torch.Generator().manual_seed(seed)))
        assert all(torch.equal(b["y"][:, 0], b["x"] * 10.0) for b in out)
        return [b["x"].tolist() for b in out]

    first = draw(0)
    assert [len(b) for b in first] == [4] * 5
    assert len(set(sum(first, []))) == 20 and set(sum(first, [])) <= set(range(23))
    assert max(first[0]) < 10  # the buffer held rows 0-9 when the first batch was drawn
    assert draw(0) == first and draw(1) != first
    assert first != [list(range(i, i + 4)) for i in range(0, 20, 4)]


def test_read_ahead_fetches_the_first_item_before_it_is_asked_for():
    """read_ahead: the first item is fetched in the background as soon as it is called; the
    items come in order; an empty iterable gives none; an error fetching the first item is
    raised by the first next(), in the caller's thread."""
    import threading

    from jobs.data import read_ahead

    asked = threading.Event()

    def items():
        asked.set()
        yield from (1, 2, 3)

    it = read_ahead(items())
    assert asked.wait(timeout=10)  # before any next()
    assert list(it) == [1, 2, 3]
    assert list(read_ahead(iter(()))) == []

    def broken():
        raise ValueError("no shard")
        yield

    it = read_ahead(broken())
    with pytest.raises(ValueError, match="^no shard$"):
        next(it)
