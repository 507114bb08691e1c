"""Ingest: one source file -> one clips part (or one error row), and the Ray tasks around it.

`ingest_file` is the plain function (decode -> batched log-mel -> Parquet part), unit-tested
without Ray. A source is a file or a segment of one (`segment_start_s` / `segment_end_s`,
pipelines/sources.py): a segment's clips carry the file's own times, and its part and error row
are its own (its `video_id`). `ingest_tasks` runs it on the cluster: sources are dealt into blocks of similar
total size, one Ray task per block, on one CPU per file (decode is the bottleneck; more CPUs
and FFmpeg threads per file when there are fewer files than CPUs), and the only thing that
flows back to the driver is one small summary row per file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from pipelines.clipstore import CLIPS, ClipStore
from pipelines.decode import Clip, DecodeConfig, MediaInfo, MediaReader, SeekUnsupported, segment_label
from pipelines.schema import ERROR_SCHEMA, encode_tensor, error_row
from pipelines.spectrogram import SpectrogramConfig, log_mel

log = logging.getLogger(__name__)

# One row per input file, returned to the driver.
SUMMARY_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("path", pa.string()),
    ("status", pa.string()),           # ok | failed | skipped (part already there, e.g. a retried task)
    ("clips", pa.int64()), ("media_seconds", pa.float64()), ("frames_decoded", pa.int64()),
    ("seconds", pa.float64()),         # wall time spent on the file
    ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string()),
])


@dataclass(frozen=True)
class IngestConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    spectrogram: SpectrogramConfig = field(default_factory=SpectrogramConfig)
    batch_clips: int = 8  # clips per log-mel batch and per Parquet row group

    def __post_init__(self) -> None:
        if self.decode.sample_rate != self.spectrogram.sample_rate:
            raise ValueError("decode and spectrogram sample rates differ")
        if self.batch_clips < 1:
            raise ValueError(f"batch_clips must be >= 1, got {self.batch_clips}")


def clip_rows(clips: list[Clip], vid: str, path: str, info: MediaInfo, cfg: IngestConfig,
              carried: dict[str, Any]) -> list[dict[str, Any]]:
    """Clip rows for a batch of clips of one file, with their log-mel computed in one call."""
    audio = torch.from_numpy(np.stack([c.audio for c in clips]))  # (B, S)
    mels = log_mel(audio, cfg.spectrogram).numpy()  # (B, M, N)
    rows = []
    for clip, mel in zip(clips, mels):
        frames, frames_shape = encode_tensor("frames", clip.frames)
        wav, wav_shape = encode_tensor("audio", clip.audio)
        lm, lm_shape = encode_tensor("logmel", mel)
        rows.append({
            "video_id": vid, "clip_id": f"{vid}-{clip.index:05d}", "source_path": path,
            "clip_index": clip.index, "start_s": clip.start_s, "end_s": clip.end_s,
            "fps": cfg.decode.fps, "sample_rate": cfg.decode.sample_rate,
            "frames": frames, "frames_shape": frames_shape, "audio": wav, "audio_shape": wav_shape,
            "logmel": lm, "logmel_shape": lm_shape, "has_audio": info.has_audio,
            "video_stream": info.video_stream, "audio_stream": info.audio_stream,
            "src_width": info.src_width, "src_height": info.src_height, "src_fps": info.src_fps,
            "rotation": info.rotation, "resize": cfg.decode.resize, **carried,
        })
    return rows


def ingest_file(source: dict[str, Any], store: ClipStore, cfg: IngestConfig, schema: pa.Schema) -> dict[str, Any]:
    """Decode one source (a file, or the segment of it its `segment_start_s` / `segment_end_s`
    name) into `OUT/clips/<video_id>.parquet`, or record why not in
    `OUT/errors/<video_id>.parquet`. Never raises for bad media or a bad segment; returns a
    summary row."""
    vid, path = source["video_id"], source["path"]
    segment = (source.get("segment_start_s"), source.get("segment_end_s"))
    carried = {k: v for k, v in source.items() if k not in ("path", "video_id")}
    summary = {"video_id": vid, "path": path, "status": "ok", "clips": 0, "media_seconds": 0.0,
               "frames_decoded": 0, "seconds": 0.0, "stage": None, "error_type": None, "message": None}
    if store.is_done(vid):  # a retried task already finished this file
        return {**summary, "status": "skipped"}
    t0 = time.perf_counter()
    stage = "open"
    reader = None
    decode = cfg.decode
    while True:
        try:
            reader = MediaReader(path, decode, segment)
            stage = "decode"
            with reader, store.open_part(CLIPS, vid, schema) as part:
                batch: list[Clip] = []

                def flush() -> None:
                    part.write(pa.Table.from_pylist(clip_rows(batch, vid, path, reader.info, cfg, carried), schema))
                    summary["clips"] += len(batch)
                    batch.clear()

                for clip in reader.clips():
                    batch.append(clip)
                    if len(batch) == cfg.batch_clips:
                        flush()
                if batch:
                    flush()
                stage = "write"
            summary["media_seconds"] = reader.media_seconds
        except SeekUnsupported as e:  # the part was aborted: decode the whole file instead
            if decode.seek != "auto":
                _failed(summary, store, path, vid, e, stage, segment)
                break
            log.info("%s: %s; decoding every frame", path, e)
            decode, summary["clips"] = dataclasses.replace(decode, seek="never"), 0
            continue
        except Exception as e:  # bad media must not fail the job: it becomes an error row
            _failed(summary, store, path, vid, e, stage, segment)
        break
    summary["frames_decoded"] = reader.frames_decoded if reader is not None else 0
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _failed(summary: dict[str, Any], store: ClipStore, path: str, vid: str, e: Exception, stage: str,
            segment: tuple[float | None, float | None] = (None, None)) -> None:
    """Record `e` as the source's error row and in its summary; a segment's message names it (once)."""
    row = error_row(path, vid, getattr(e, "stage", stage), e)
    label = segment_label(*segment)
    if label != "whole file" and label not in row["message"]:
        row["message"] = f"{label}: {row['message']}"
    store.write_error(row, ERROR_SCHEMA)
    summary.update(status="failed", clips=0, stage=row["stage"], error_type=row["error_type"], message=row["message"])
    log.debug("failed %s: %s", path, e)


def _ingest_batch(batch: pa.Table, store: ClipStore, cfg: IngestConfig, schema: pa.Schema) -> pa.Table:
    """One Ray task's work: a block of source rows -> their summary rows."""
    torch.set_num_threads(1)
    rows = [ingest_file(src, store, cfg, schema) for src in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA)


def balanced_blocks(sources: pa.Table, n: int) -> list[pa.Table]:
    """Deal sources into `n` blocks of similar total size: largest file first, in snake order
    (0, 1, ..., n-1, n-1, ..., 0, ...), so each block starts with a big file and no block
    collects the tail. Files whose size cannot be read (URIs) count as empty."""
    def size(p: str) -> int:
        try:
            return os.stat(p).st_size
        except OSError:
            return 0

    order = np.argsort([-size(p) for p in sources.column("path").to_pylist()], kind="stable")
    idx: list[list[int]] = [[] for _ in range(n)]
    for rank, i in enumerate(order):
        lap, k = divmod(rank, n)
        idx[k if lap % 2 == 0 else n - 1 - k].append(int(i))
    return [sources.take(ix) for ix in idx if ix]


MAX_DECODE_THREADS = 16  # FFmpeg's frame threading gains little past this


def plan_tasks(num_files: int, node_cpus: list[int], free_cpus: int | None = None,
               files_per_task: int = 8) -> tuple[int, int]:
    """(blocks, FFmpeg decoder threads per file) for `num_files` files on nodes of `node_cpus`
    CPUs, of which `free_cpus` (default: all) are free now.

    Blocks: at least 2 per CPU for balance, at most `files_per_task` files each, a multiple of the
    CPUs, never more than the files. A task runs one file at a time on one CPU; when there are
    fewer files than free CPUs, each file's task asks for more CPUs and its decoder runs that
    many threads: the most (<= MAX_DECODE_THREADS, <= the free CPUs per file) at which the tasks
    still all fit on the nodes at once. A single long file on a 16-CPU node decodes with 16 threads, 100 files
    with 1 each (no oversubscription); 5 files on 4 nodes of 8 CPUs with 4 each (2 a node)."""
    cpus = sum(node_cpus)
    free = cpus if free_cpus is None else max(1, min(free_cpus, cpus))
    blocks = max(2 * cpus, -(-num_files // files_per_task))
    blocks = min(num_files, -(-blocks // cpus) * cpus)  # a multiple of the CPUs: no last round of one task
    threads = 1
    for t in range(2, min(MAX_DECODE_THREADS, free // max(1, num_files)) + 1):
        if sum(n // t for n in node_cpus) >= num_files:
            threads = t
    return blocks, threads


def ingest_tasks(sources: pa.Table, store: ClipStore, cfg: IngestConfig, schema: pa.Schema,
                 files_per_task: int = 8, resources: dict[str, float] | None = None) -> Iterator[pa.Table]:
    """Run the ingest as plain Ray tasks on the connected cluster, one per block of files
    (`plan_tasks`); yield each task's summary rows as it finishes, in completion order.

    Plain tasks, not a Ray Data `map_batches`: the streaming executor ran one task for the first
    ~10 s of a job on 2 CPUs (its resource budget held the other back) and cost 1.2-1.3x the wall
    time of `multiprocessing.Pool(2)` over the same function (BENCHMARKS.md, ingest at the decode
    ceiling). At most 2 tasks per CPU are submitted at a time (the rest follow as they finish), and
    nothing but a small summary per file flows back. A task whose worker dies is retried by Ray (it
    skips the files it already committed); one that still fails is logged and its files, with
    neither a summary nor a part, become error rows in the caller (`record_lost_files`); when every
    task fails (e.g. OUT not writable, the code missing on the workers) the error is raised.
    Memory: one file's clips in flight per running task. `resources`: custom resources every task
    asks for (jobs.placement: {"decode": 0.001} on a cluster with decode nodes); the plan counts
    only the nodes that have them."""
    import ray

    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]
                 and all(n["Resources"].get(k, 0) >= v for k, v in (resources or {}).items())]
    node_cpus = [n for n in node_cpus if n] or [1]
    blocks, threads = plan_tasks(sources.num_rows, node_cpus, int(ray.available_resources().get("CPU", 0)),
                                 files_per_task)
    if threads > 1:
        cfg = dataclasses.replace(cfg, decode=dataclasses.replace(cfg.decode, threads=threads))
    task = ray.remote(num_cpus=threads, max_retries=3, resources=resources or None)(_ingest_batch)
    args = ray.put(store), ray.put(cfg), ray.put(schema)
    todo = balanced_blocks(sources, blocks)[::-1]  # popped from the end: in the order dealt
    tasks = len(todo)
    window = 2 * sum(node_cpus)
    pending: list = []
    failed, first_error = 0, None
    try:
        while todo or pending:
            while todo and len(pending) < window:
                pending.append(task.remote(todo.pop(), *args))
            done, pending = ray.wait(pending, num_returns=1)
            try:
                yield ray.get(done[0])
            except ray.exceptions.RayError as e:  # a task that died for good: its files are recorded lost
                failed, first_error = failed + 1, first_error or e
                log.warning("an ingest task failed: %s", e)
    finally:  # stopped early (Ctrl-C): the cluster stops too; committed files stay, a rerun skips them
        for ref in pending:
            ray.cancel(ref)
    if failed and failed == tasks:
        raise RuntimeError(f"every ingest task failed; the first: {first_error}") from first_error
