"""Decode videos into clip Parquet (frames + audio + log-mel) on Ray tasks, streaming.

INPUT is any mix of files, folders (searched recursively for video extensions), globs and
manifests (.csv / .jsonl with a `path` column; other columns are carried into every clip row;
`segment_start_s` / `segment_end_s` ingest only that span of the file, its clips in the file's
times; a malformed row refuses the run, named by its line number).
Writes OUT/clips/*.parquet (one row per clip), OUT/errors/*.parquet (one row per file or segment
that gave no clips, with the reason: stage `missing` for a listed file not on disk) and
OUT/summary.json. Rerunning with the same OUT skips finished files and segments; --overwrite
starts over. Runs on the Ray cluster at --address / RAY_ADDRESS,
or on a local Ray it starts.

example:
  avray preprocess videos/ extra.mp4 labels.csv --out data/ --clip-seconds 2 --fps 8 --size 224
  python -c "import pyarrow.parquet as pq; print(pq.read_table('data/clips').num_rows)"
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessConfig:
    inputs: tuple[str, ...] = field(metadata={"help": "files, folders, globs or .csv/.jsonl manifests", "positional": True})
    out: str = field(metadata={"help": "output folder (or s3://... URI)", "short": "-o"})
    clip_seconds: float = field(default=2.0, metadata={"help": "clip length in seconds"})
    hop_seconds: float | None = field(default=None, metadata={"help": "seconds between clip starts (default: clip length)"})
    fps: float = field(default=8.0, metadata={"help": "frames sampled per second of video"})
    size: int = field(default=224, metadata={"help": "output frame side in pixels"})
    resize: str = field(default="crop", metadata={"help": "crop: short side to SIZE then centre crop; letterbox: long side to SIZE then pad", "choices": ("crop", "letterbox")})
    sample_rate: int = field(default=16000, metadata={"help": "audio sampling rate (Hz), mono"})
    n_mels: int = field(default=64, metadata={"help": "mel bands of the stored log-mel"})
    n_fft: int = field(default=512, metadata={"help": "FFT size of the log-mel"})
    hop_length: int = field(default=160, metadata={"help": "log-mel hop in samples"})
    win_length: int = field(default=400, metadata={"help": "log-mel window in samples"})
    max_pixels: int = field(default=3840 * 2160, metadata={"help": "larger videos become error rows"})
    max_seconds: float = field(default=4 * 3600.0, metadata={"help": "longer videos become error rows"})
    allow_scheme: tuple[str, ...] = field(default=(), metadata={"help": "URI schemes to open besides local files: http, https, rtmp (through FFmpeg), s3, gs, gcs, hdfs, abfs, abfss (object stores, through pyarrow.fs; credentials from its usual environment, e.g. AWS_*)"})
    seek: str = field(default="auto", metadata={"help": "seek path: decode only the frames the sampled instants show (exactly the frames of a full decode); auto: when the source rate is >= 4x --fps (mp4/mov/mkv/webm files); never: decode every frame", "choices": ("auto", "always", "never")})
    keyframes_only: bool = field(default=False, metadata={"help": "decode keyframes only: each sampled instant shows the latest keyframe at or before it, APPROXIMATE in time (off by up to a keyframe interval); much faster at low --fps"})
    batch_clips: int = field(default=8, metadata={"help": "clips per log-mel batch and Parquet row group"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else start a local Ray)"})
    num_cpus: int | None = field(default=None, metadata={"help": "CPUs of the local Ray it starts (default: all)"})
    overwrite: bool = field(default=False, metadata={"help": "delete what OUT holds and start over"})
    retry_failed: bool = field(default=False, metadata={"help": "try the files in OUT/errors again"})


def _ingest_config(cfg: PreprocessConfig):
    """The clip settings of `cfg` (pipelines.clipsettings: what a clip contains, also written to
    OUT/_config.json) with this run's limits."""
    from pipelines.clipsettings import ClipSettings
    from pipelines.ingest import IngestConfig

    clip = ClipSettings.from_fields(cfg)
    decode = clip.decode_config(max_pixels=cfg.max_pixels, max_seconds=cfg.max_seconds,
                                allowed_schemes=tuple(cfg.allow_scheme), seek=cfg.seek,
                                keyframes_only=cfg.keyframes_only)
    return clip, IngestConfig(decode=decode, spectrogram=clip.spectrogram_config(), batch_clips=cfg.batch_clips)


def run(cfg: PreprocessConfig) -> int:
    import pyarrow as pa
    import ray

    from jobs.placement import DECODE, stage_resources
    from pipelines.clipstore import ERRORS, ClipStore
    from pipelines.ingest import ingest_tasks
    from pipelines.schema import clip_schema
    from pipelines.sources import carried_schema, list_sources

    t_start = time.perf_counter()
    clip, icfg = _ingest_config(cfg)
    sources = list_sources(cfg.inputs)
    if sources.num_rows == 0:
        raise ValueError(f"no video files found in {list(cfg.inputs)}")
    carried = carried_schema(sources)
    schema = clip_schema(carried)

    store = ClipStore(cfg.out)
    if cfg.overwrite:
        store.clear()
    store.create()
    # what the clips contain: a rerun into the same OUT must keep it (avray train copies it into checkpoints)
    # keyframes-only clips are approximate in time: recorded so that a rerun cannot mix them with exact ones
    settings = {**clip.to_dict(), "carried_columns": carried.names, **({"keyframes_only": True} if cfg.keyframes_only else {})}
    previous = store.read_json("_config.json")
    if previous is not None and previous != settings:
        diff = {k: (previous.get(k), settings[k]) for k in settings if previous.get(k) != settings[k]}
        raise ValueError(f"{cfg.out} holds clips made with other settings {diff} (old, new); "
                         "use --overwrite or another --out")
    store.write_json("_config.json", settings)
    if (n := store.remove_temporaries()):
        log.info("removed %d unfinished part(s) of an interrupted run", n)
    if cfg.retry_failed:
        fs, _ = store.fs_root
        for p in store.list_parts(ERRORS).values():
            fs.delete_file(p)

    done = store.done()
    ids = sources.column("video_id").to_pylist()
    pending = sources.filter(pa.array([v not in done for v in ids]))
    log.info("%d source(s) (files or segments): %d already done, %d to process", len(ids), len(ids) - pending.num_rows,
             pending.num_rows)

    started_ray = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address, num_cpus=None if address else cfg.num_cpus,
                 log_to_driver=True, include_dashboard=False)
        started_ray = True
    rows: list[dict[str, Any]] = []
    try:
        if pending.num_rows:
            last = time.perf_counter()
            for batch in ingest_tasks(pending, store, icfg, schema, resources=stage_resources(DECODE)):
                rows.extend(batch.to_pylist())
                if time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    log.info("%d/%d files, %d clips", len(rows), pending.num_rows, sum(r["clips"] for r in rows))
        rows += record_lost_files(pending, rows, store)
    except KeyboardInterrupt:
        log.warning("interrupted: finished files are kept; rerun the same command to continue")
        raise
    finally:
        if started_ray:
            ray.shutdown()

    summary = _summarise(rows, store, len(ids) - pending.num_rows, time.perf_counter() - t_start)
    store.write_json("summary.json", summary)
    print(_format_summary(summary, cfg.out))
    return 0


def record_lost_files(pending, rows: list[dict[str, Any]], store) -> list[dict[str, Any]]:
    """Error rows (written to OUT/errors and returned as summary rows) for pending files with
    neither a summary row nor a part: their task died (worker crash) or failed outside the
    per-file error handling. A task that committed its part before dying keeps it."""
    from pipelines.ingest import SUMMARY_SCHEMA
    from pipelines.schema import ERROR_SCHEMA, error_row

    seen = {r["video_id"] for r in rows}
    have = store.done()
    lost = []
    for src in pending.select(["path", "video_id"]).to_pylist():
        if src["video_id"] not in seen and src["video_id"] not in have:
            row = error_row(src["path"], src["video_id"], "worker",
                            "the task processing this file died or failed; see the Ray logs")
            store.write_error(row, ERROR_SCHEMA)
            lost.append({**{k: None for k in SUMMARY_SCHEMA.names}, **row, "status": "failed",
                         "clips": 0, "media_seconds": 0.0, "frames_decoded": 0, "seconds": 0.0})
    return lost


def _summarise(rows: list[dict[str, Any]], store, skipped: int, wall: float) -> dict[str, Any]:
    from pipelines.clipstore import CLIPS, ERRORS

    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    media = sum(r["media_seconds"] or 0.0 for r in ok)
    frames = sum(r["frames_decoded"] or 0 for r in rows)
    clip_parts, error_parts = store.list_parts(CLIPS), store.list_parts(ERRORS)
    return {
        "run": {
            "files": len(rows) + skipped, "files_ok": len(ok), "files_failed": len(failed),
            "files_skipped_done": skipped + sum(r["status"] == "skipped" for r in rows),
            "clips": sum(r["clips"] for r in ok), "media_seconds": round(media, 3),
            "frames_decoded": frames, "wall_seconds": round(wall, 3),
            "media_seconds_per_second": round(media / wall, 3) if wall else 0.0,
            "frames_decoded_per_second": round(frames / wall, 1) if wall else 0.0,
            "failed": [{k: r[k] for k in ("path", "stage", "error_type", "message")} for r in failed],
        },
        "out": {"files_ok": len(clip_parts), "files_failed": len(error_parts),
                "clips": store.count_rows(clip_parts.values()),
                "clips_dir": store.path(CLIPS), "errors_dir": store.path(ERRORS)},
    }


def _format_summary(s: dict[str, Any], out: str) -> str:
    r, o = s["run"], s["out"]
    lines = [
        f"avray preprocess: {r['files']} file(s): {r['files_ok']} ok, {r['files_failed']} failed, "
        f"{r['files_skipped_done']} already done",
        f"  this run: {r['clips']} clips from {r['media_seconds']:.1f} media s in {r['wall_seconds']:.1f} s "
        f"({r['media_seconds_per_second']:.1f} media s/s, {r['frames_decoded_per_second']:.0f} decoded frames/s)",
        f"  {out}: {o['clips']} clips from {o['files_ok']} file(s) in {o['clips_dir']}",
    ]
    if o["files_failed"]:
        lines.append(f"  {o['files_failed']} failed file(s) listed in {o['errors_dir']}")
    for f in r["failed"][:10]:
        lines.append(f"    {f['path']}: {f['stage']}: {f['error_type']}: {f['message']}")
    if len(r["failed"]) > 10:
        lines.append(f"    ... and {len(r['failed']) - 10} more")
    lines.append(f"  read: pyarrow.parquet.read_table('{o['clips_dir']}') or ray.data.read_parquet(...)")
    return "\n".join(lines)


CONFIG = PreprocessConfig
