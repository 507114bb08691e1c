"""The training data layer: clip stores split by video, streamed to Ray Train workers, and plain
numpy batches of a clip folder (evaluation, benchmarks).

- `validation_videos` / `split_store`: a deterministic train / validation split by video id;
- `clip_dataset`: a Split as a Ray Dataset whose tasks read groups of files with pyarrow and
  `prepare` them (the task's CPU work happens off the training worker);
- `torch_batches`: a dataset shard's tensor batches, shuffled by `shuffled_batches` in training;
- `read_ahead`: an iterator whose first item is fetched in the background;
- `numpy_batches`: a clip folder's rows as numpy batches of a fixed size, without Ray;
- `keep_idle_workers`: the Ray setting that keeps the read tasks' worker processes alive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

SHUFFLE_BATCHES = 8  # training batches are drawn from a buffer of this many batches' clips
IDLE_WORKERS = 4  # at least this many idle worker processes a local Ray started by avray keeps


def keep_idle_workers(n: int = IDLE_WORKERS) -> None:
    """Let a local Ray started after this call keep up to max(`n`, 2 x CPU count) idle worker
    processes (RAY_num_workers_soft_limit, unless already set; a Ray that is already running keeps
    its own).

    By default Ray keeps only as many idle workers as there are CPUs, and kills the rest, so the
    next use starts a fresh process that imports torch again. avray train runs two pipelines of
    read tasks: the training split (up to a task per free CPU) and the validation split (up to a
    task per block, at once), so at each epoch's end more workers fall idle than there are CPUs.
    Measured: on 2 cores, 4.5 s of every epoch and as long again for each validation pass went to
    restarting the read tasks' worker; on a 16-CPU H100 node, separation (paper preset) ran epochs
    2-4 at 34, 114 and 33 clips/s with the default limit of 16, and at 111, 110 and 109 with 40."""
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(n, 2 * (os.cpu_count() or 1))))


def is_validation(video_id: str, fraction: float) -> bool:
    """Deterministic split by video: the first 8 hex digits of the id, as a fraction of 2**32."""
    return int(video_id[:8], 16) / 2**32 < fraction


def validation_videos(video_ids, fraction: float):
    """The held-out videos: those `is_validation` picks, but at least one file, and never all (a
    small dataset could otherwise get an empty split). The split is by source file: the segments
    of one file (ids sharing its first 8 hex digits, pipelines.sources) fall on one side. Returns a
    pyarrow string array."""
    import pyarrow as pa

    files: dict[str, list[str]] = {}
    for v in sorted(set(video_ids.to_pylist())):
        files.setdefault(v[:8], []).append(v)
    if len(files) < 2:
        raise ValueError(f"need clips of at least 2 video files to hold some out, got {len(files)}")
    keys = sorted(files)
    val = [k for k in keys if is_validation(k, fraction)] or keys[:1]  # keys[:1]: the smallest hash
    if len(val) == len(keys):
        val = val[:-1]
    return pa.array([v for k in val for v in files[k]], pa.string())


def torch_batches(data, batch_size: int, train: bool, shuffle: bool, gen=None, device=None):
    """Tensor batches of a Ray Dataset or dataset shard, 2 batches prefetched. In training the
    last, partial batch is dropped and, with `shuffle`, every batch is drawn at random from a
    buffer of SHUFFLE_BATCHES batches' rows (`shuffled_batches`, with `gen`; on `device` when
    given), a new draw each epoch, so batches do not hold the same clips every epoch, nor always
    both clips of a video (they share a file)."""
    it = data.iter_torch_batches(batch_size=batch_size, prefetch_batches=2, drop_last=train and not shuffle)
    if train and shuffle:
        return shuffled_batches(it, batch_size, SHUFFLE_BATCHES * batch_size, gen, device)
    return it


def shuffled_batches(batches, batch_size: int, buffer_rows: int, gen=None, device=None):
    """Re-batch an iterable of tensor batches (dicts of tensors of equal length) into batches of
    `batch_size` rows drawn uniformly at random, without replacement, from a buffer: incoming
    batches fill it to at least `buffer_rows` rows (or until they run out), and refill it so after
    every batch drawn. The last, partial batch is dropped. `gen`: the
    torch.Generator of the draws. With `device`, incoming batches move there first and the draws
    gather there.

    A drawn batch holds its rows grouped by the incoming batch they came from (the draw itself is
    uniform). Each row is copied once (index_select into the drawn batch); Ray Data's local
    shuffle buffer (`iter_torch_batches(local_shuffle_buffer_size=...)`) copies every row 3-4
    times (compaction, concatenation, take) and gave ~1,000-1,800 rows/s of 224-px localization
    rows on one core of a 2-core machine (this: 9,000-15,000), against the ~3,300 samples/s an H100
    trains the paper preset at (BENCHMARKS.md)."""
    import torch

    pool: list[tuple[dict, torch.Tensor]] = []  # (incoming batch, indices of its rows not yet drawn)
    it = iter(batches)

    def rows() -> int:
        return sum(len(left) for _, left in pool)

    def refill(target: int) -> None:
        while rows() < target:
            b = next(it, None)
            if b is None:
                return
            if device is not None:
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            pool.append((b, torch.arange(len(next(iter(b.values()))))))

    refill(buffer_rows)
    while rows() >= batch_size:
        sizes = torch.tensor([len(left) for _, left in pool])
        ends = sizes.cumsum(0)
        pick = torch.randperm(int(ends[-1]), generator=gen)[:batch_size].sort().values
        owner = torch.searchsorted(ends, pick, right=True)  # the pool entry of each drawn row
        starts = ends - sizes
        out = {k: v.new_empty((batch_size, *v.shape[1:])) for k, v in pool[0][0].items()}
        pos, kept = 0, []
        for i, (b, left) in enumerate(pool):
            chosen = pick[owner == i] - starts[i]
            if len(chosen):
                idx = left[chosen]
                for k, v in b.items():
                    torch.index_select(v, 0, idx.to(v.device), out=out[k][pos:pos + len(idx)])
                pos += len(idx)
                mask = torch.ones(len(left), dtype=torch.bool)
                mask[chosen] = False
                left = left[mask]
            if len(left):
                kept.append((b, left))
        pool[:] = kept
        yield out
        refill(buffer_rows)


def read_ahead(items: Iterable[Any]) -> Iterator[Any]:
    """Iterate `items`, whose first item a background thread starts fetching at once: a Ray
    Data pipeline starts, and the shuffle buffer fills, while the caller does other work
    (building the model, validating, checkpointing). An exception raised fetching it is raised
    by the first next().

    Measured (benchmarks/train.py's localization, 2 cores): each epoch's first batch, a new
    streaming execution plus SHUFFLE_BATCHES read tasks, took 0.52-0.56 s of a 6.6-6.8 s epoch;
    fetched ahead during validation, 0 s, and the epoch 6.0-6.1 s."""
    import threading

    it = iter(items)
    first: dict[str, Any] = {}

    def fetch() -> None:
        try:
            first["item"] = next(it, first)  # `first` itself marks an empty iterator
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            first["error"] = e

    thread = threading.Thread(target=fetch, name="avray-read-ahead", daemon=True)
    thread.start()

    def consume() -> Iterator[Any]:
        thread.join()
        if "error" in first:
            raise first["error"]
        if first["item"] is not first:
            yield first["item"]
            yield from it
    return consume()


@dataclass(frozen=True)
class Split:
    """Part of a clip store: `files` (with `file_rows` of its rows in each, `rows` in all) and,
    when some files hold clips of both splits, the validation videos to keep or drop (`val_ids`,
    `keep`)."""

    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    rows: int
    val_ids: Any = None  # pyarrow string array, or None: every row of `files`
    keep: bool = False  # keep (True) or drop (False) the rows of val_ids
    filesystem: Any = None  # the pyarrow filesystem `files` are paths on (None: local)
    schema: Any = None  # the store's schema (pyarrow): every group of files is read with it

    def read(self, columns: list[str], files: Any = None):
        """The split's rows of `files` (default: all of them) as one pyarrow Table. With `schema`,
        a file that lacks one of its columns (a part written before the column existed) gives
        nulls there, whichever file of a group comes first."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        flt = None
        if self.val_ids is not None:
            flt = pc.field("video_id").isin(self.val_ids)
            flt = flt if self.keep else ~flt
        return pads.dataset(list(self.files if files is None else files), format="parquet",
                            filesystem=self.filesystem, schema=self.schema).to_table(columns=columns, filter=flt)


def split_store(ids, val_ids, filesystem=None, schema=None) -> tuple[Split, Split]:
    """(train, validation) Splits of a clip store. ids: video_id + __filename of every row. When
    no file holds clips of both sides (the clip store's layout: OUT/clips/<video_id>.parquet)
    each split reads only its own files; otherwise the files holding both are read by both
    splits, which filter their rows by video."""
    import pyarrow.compute as pc

    t = ids.append_column("val", pc.is_in(ids.column("video_id"), value_set=val_ids))
    per_side = t.group_by(["__filename", "val"]).aggregate([("video_id", "count")]).sort_by("__filename")
    mixed = per_side.group_by("__filename").aggregate([("val", "count")]).filter(pc.field("val_count") > 1).num_rows > 0

    def side(val: bool) -> Split:
        part = per_side.filter(pc.field("val") == val)
        counts = part.column("video_id_count").to_pylist()
        return Split(tuple(part.column("__filename").to_pylist()), tuple(counts), sum(counts),
                     val_ids if mixed else None, keep=val, filesystem=filesystem, schema=schema)

    return side(False), side(True)


def clip_dataset(split: Split, columns: list[str], prepare=None, rows_per_task: int = 32):
    """A Ray Dataset of a Split's clips, `prepare`d in Ray Data tasks (e.g. task.prepare; None:
    the rows as numpy batches). Each task reads a group of files holding about `rows_per_task`
    rows with pyarrow, then prepares them: a clip store holds one file per video, often of a few
    clips, and read_parquet's cost per file (measured ~10-20 ms on 2 cores, against ~0.7 ms for
    pyarrow) would otherwise set the pace of training. The groups are read in file order
    (`randomize_block_order` on them breaks `streaming_split` in Ray 2.58: the coordinator cannot
    register callbacks on blocks the driver owns); `torch_batches` shuffles rows."""
    import ray.data

    from pipelines.schema import numpy_batch

    groups: list[list[str]] = []
    rows = rows_per_task
    for f, n in zip(split.files, split.file_rows):
        if rows >= rows_per_task:
            groups.append([])
            rows = 0
        groups[-1].append(f)
        rows += n

    def read(batch: dict[str, Any]) -> dict[str, Any]:
        (files,) = batch["files"]
        out = numpy_batch(split.read(columns, list(files)))
        return out if prepare is None else prepare(out)

    items = [{"files": g} for g in groups]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read, batch_size=1, batch_format="numpy")


def clip_folder(folder: str):
    """(pyarrow filesystem, path on it) of a clip folder, local or a URI (s3://, gs://, ...);
    FileNotFoundError when it is not a folder there."""
    import pyarrow.fs as pafs

    from pipelines.clipstore import filesystem

    fs, root = filesystem(folder)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no clip folder at {folder} (run avray preprocess first)")
    return fs, root


def clip_files(folder: str, filesystem=None) -> list[str]:
    """The Parquet parts under `folder` (a path on `filesystem`; None: a local folder), not the
    hidden or temporary ones."""
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
             if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
             and not i.base_name.startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"no Parquet clips in {folder}")
    return files


def numpy_batches(folder: str, columns: list[str], batch_size: int, filter=None, limit: int | None = None,
                  drop_last: bool = False, filesystem=None) -> Iterator[dict[str, Any]]:
    """The rows of a clip folder (a path on the pyarrow `filesystem`; None: a local path or a URI
    that names its store) (those matching the pyarrow `filter`; at most `limit`) as numpy
    batches (`pipelines.schema.numpy_batch`) of `batch_size` rows, the last one shorter unless
    `drop_last`; only `columns` that the files hold are read. pyarrow yields at most batch_size
    rows per record batch and never spans two files, and a file holds one video's clips, so record
    batches are re-batched here: separation mixes and localization swaps audio within a batch,
    which must hold several videos."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    from pipelines.schema import numpy_batch

    ds = pads.dataset(folder, format="parquet", filesystem=filesystem)
    cols = [c for c in columns if c in ds.schema.names]
    left = limit
    buf: list = []
    rows = 0
    for rb in ds.to_batches(columns=cols, filter=filter, batch_size=batch_size):
        if left is not None:
            rb = rb.slice(0, max(left, 0))
            left -= rb.num_rows
        if rb.num_rows:
            buf.append(rb)
            rows += rb.num_rows
        while rows >= batch_size:
            table = pa.Table.from_batches(buf)
            yield numpy_batch(table.slice(0, batch_size))
            rest = table.slice(batch_size)
            buf, rows = rest.to_batches(), rest.num_rows
        if left is not None and left <= 0:
            break
    if rows and not drop_last:
        yield numpy_batch(pa.Table.from_batches(buf))
