"""Embed every clip of a clip folder with a retrieval checkpoint (Ray Data batch inference, streaming).

DATA is a clip folder of `avray preprocess` (one Parquet file per video); OUT receives one
embeddings part per video (OUT/embeddings/<video_id>.parquet: each clip's video, audio and fused
embeddings, with its place in its source video and the manifest columns), error rows for clips
(or files) that could not be embedded (OUT/errors/), OUT/_config.json (the checkpoint and its
clip settings) and OUT/summary.json. Ray Data runs a pool of actors that each load the model once
(on a GPU when the cluster has them); the clips of the files an actor takes go through the model
in batches across files, so memory is bounded by a batch, never by the dataset. Parts are written
atomically: a rerun skips the videos already done and never duplicates a row; a rerun with another
checkpoint is refused (--overwrite starts over).

example:
  avray train --task retrieval --data data/clips --out runs/ret --epochs 10
  avray embed --checkpoint runs/ret/model.pt --data data/clips --out emb/
  avray search emb/ --text "a red circle on the left hums"
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"  # OUT/embeddings/<video_id>.parquet
CAPTION_COLUMNS = ("video_id", "start_s", "end_s", "ground_truth", "caption")  # what clip_captions_or_none reads


@dataclass(frozen=True)
class EmbedConfig:
    checkpoint: str = field(metadata={"help": "retrieval checkpoint (avray train --task retrieval's model.pt)"})
    data: str = field(metadata={"help": "clip Parquet folder (OUT/clips of avray preprocess)"})
    out: str = field(metadata={"help": "output folder: embeddings/, errors/, _config.json, summary.json", "short": "-o"})
    batch_size: int = field(default=64, metadata={"help": "clips per forward pass"})
    files_per_task: int = field(default=32, metadata={"help": "clip files (videos) per Ray Data batch: their clips "
                                                                "share forward passes"})
    actors: int = field(default=0, metadata={"help": "model actors (0: one per GPU, else one per CPU)"})
    use_gpu: str = field(default="auto", metadata={"help": "auto: a GPU per actor when the cluster has them",
                                                   "choices": ("auto", "yes", "no")})
    overwrite: bool = field(default=False, metadata={"help": "delete what OUT holds and start over"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else a local Ray)"})


def checkpoint_id(path: str) -> str:
    """sha1 of a checkpoint file's bytes: which model made an embeddings folder."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Embedder:
    """A retrieval model loaded once, embedding whole clip files: `embed_files` is the plain function
    (tested without Ray); `__call__` is the Ray Data actor's batch of files -> their summary rows."""

    def __init__(self, checkpoint: str, store, schema, batch_size: int, device: str | None = None,
                 filesystem=None) -> None:
        import torch

        from jobs.allocator import keep_freed_memory
        from jobs.tasks import get, load_checkpoint

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # one actor per CPU
            keep_freed_memory()
        self.model, _ = load_checkpoint(checkpoint, self.device, task="retrieval")
        self.store, self.schema, self.batch_size = store, schema, batch_size
        self.filesystem = filesystem  # what the clip files' paths are on (None: local)
        self.task = get("retrieval")
        # what is read of a clip file: what prepare reads, then the embeddings table's own columns
        self.read_columns = list(dict.fromkeys([*self.task.columns, *(schema.names if schema is not None else ())]))

    def embed_rows(self, rows: dict[str, Any]):
        """numpy clip rows -> video, audio, fused embeddings, float32 (B, D) each."""
        import torch

        from jobs.tasks.base import as_tensors, on_device
        from models.retrieval import fuse

        x = on_device(as_tensors(self.task.prepare(rows, self.model.cfg, targets=False)), self.device)
        with torch.inference_mode():
            v, a = self.model.encode_video(x["frames"]).float().cpu(), self.model.encode_audio(x["logmel"]).float().cpu()
            f = fuse(v, a)
        return v.numpy(), a.numpy(), f.numpy()

    def embed_table(self, table):
        """Clip rows -> (indices of the rows embedded, their vectors (video, audio, fused), [(row
        index, exception)] of the rows that failed). A bad row fails its whole batch, so then the
        rows are embedded one by one to keep the good ones. The caption columns are not given to
        the model (prepare without targets reads none; a scene's JSON is ~24 kB a clip for 10 s)."""
        import numpy as np

        from pipelines.schema import numpy_batch

        table = table.drop_columns([c for c in ("ground_truth", "caption") if c in table.column_names])
        try:
            return list(range(table.num_rows)), self.embed_rows(numpy_batch(table)), []
        except Exception:  # noqa: BLE001 - find the bad rows below
            good, parts, bad = [], [], []
            for i in range(table.num_rows):
                try:
                    parts.append(self.embed_rows(numpy_batch(table.slice(i, 1))))
                    good.append(i)
                except Exception as e:  # noqa: BLE001 - becomes its error row
                    bad.append((i, e))
            return good, tuple(np.concatenate([p[k] for p in parts]) for k in range(3)) if parts else None, bad

    def output_rows(self, table, vectors):
        """Embedded clip rows (any columns, in the order of `vectors`) -> the embeddings table's rows:
        the schema's columns of `table`, each clip's caption (computed from only the columns captions
        read, never the frames) and the three vector columns."""
        import pyarrow as pa

        from pipelines.groundtruth import clip_captions_or_none
        from pipelines.schema import numpy_batch

        out = {n: table.column(n) for n in self.schema.names if n in table.column_names}
        text = table.select([c for c in CAPTION_COLUMNS if c in table.column_names])
        out["caption"] = pa.array(clip_captions_or_none(numpy_batch(text)), pa.string())
        for name, v in zip(("video_emb", "audio_emb", "emb"), vectors):
            out[name] = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])
        return pa.Table.from_pydict({n: out[n] for n in self.schema.names}, schema=self.schema)

    def embed_files(self, paths: list[str]) -> list[dict[str, Any]]:
        """Clip files -> their embeddings parts and an error row per clip that could not be embedded
        (or one for a file that cannot be read); never raises for bad input. The clips of all the
        files go through the model together, `batch_size` at a time (a 4 s video has 2 clips: one
        forward pass per file would be a pass of 2), so memory is a batch plus one read piece of a
        file, whatever the videos' lengths; each file's part is committed atomically at the end.
        Per batch, not per file: one conversion to numpy for the model, one of the caption columns,
        one output table, which each file's part gets a zero-copy slice of.
        Returns a summary row per file: video_id, path, status (ok | failed | skipped), clips, errors."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipelines.clipstore import ERRORS
        from pipelines.schema import ERROR_SCHEMA, error_row

        summaries: dict[str, dict[str, Any]] = {}
        parts: dict[str, Any] = {}
        errors: dict[str, list[dict[str, str]]] = {}
        failed: set[str] = set()
        pending: list[tuple[str, str, Any]] = []  # (video id, path, clip rows) waiting for the model

        def fail(vid: str, path: str, e: Exception, stage: str = "read") -> None:
            errors[vid].append(error_row(path, vid, stage, e))
            failed.add(vid)
            pending[:] = [p for p in pending if p[0] != vid]

        def write(vid: str, rows) -> None:
            if vid not in parts:
                parts[vid] = self.store.open_part(EMBEDDINGS, vid, self.schema)
            parts[vid].write(rows)
            summaries[vid]["clips"] += rows.num_rows

        def flush() -> None:
            if not pending:
                return
            table = pa.concat_tables([t for _, _, t in pending], promote_options="default")
            good, vectors, bad = self.embed_table(table)
            good = np.asarray(good, dtype=np.int64)
            rows = None  # the output rows of all the good clips of the batch, built once
            if vectors is not None:
                try:
                    rows = self.output_rows(table if len(good) == table.num_rows else table.take(good), vectors)
                except Exception:  # noqa: BLE001 - one file's odd columns: build each file's rows alone below
                    pass
            start = 0
            for vid, path, piece in list(pending):
                stop = start + piece.num_rows
                ids = piece.column("clip_id").to_pylist() if bad else None
                errors[vid] += [error_row(path, vid, "embed", f"clip {ids[i - start]}: {type(e).__name__}: {e}")
                                for i, e in bad if start <= i < stop]
                lo, hi = np.searchsorted(good, start), np.searchsorted(good, stop)  # good is sorted: a range
                if vectors is not None and hi > lo:
                    try:
                        write(vid, rows.slice(lo, hi - lo) if rows is not None else
                              self.output_rows(piece.take(good[lo:hi] - start), [v[lo:hi] for v in vectors]))
                    except Exception as e:  # noqa: BLE001 - a part that cannot be written fails its file
                        fail(vid, path, e, "write")
                start = stop
            pending.clear()

        for path in paths:
            vid = os.path.basename(path)[: -len(".parquet")]
            summaries[vid] = {"video_id": vid, "path": path, "status": "ok", "clips": 0, "errors": 0}
            errors[vid] = []
            if self.store.is_done(vid):  # a retried task already finished this file
                summaries[vid]["status"] = "skipped"
                continue
            try:
                pf = pq.ParquetFile(path, filesystem=self.filesystem)
                names = set(pf.schema_arrow.names)
                columns = [c for c in self.read_columns if c in names]
                # one CPU per actor: no reader threads (measured 0.2 ms a file faster)
                for rb in pf.iter_batches(batch_size=self.batch_size, columns=columns, use_threads=False):
                    piece = pa.Table.from_batches([rb])
                    while piece.num_rows:  # fill the batch exactly; the rest of the piece starts the next
                        room = self.batch_size - sum(t.num_rows for _, _, t in pending)
                        pending.append((vid, path, piece.slice(0, room)))
                        piece = piece.slice(room)
                        if room <= pending[-1][2].num_rows:
                            flush()
            except Exception as e:  # noqa: BLE001 - a file that cannot be read (or breaks midway) is one error row
                fail(vid, path, e)
        flush()

        for vid, summary in summaries.items():
            if summary["status"] == "skipped":
                continue
            if vid in failed:
                summary["clips"] = 0
                if vid in parts:
                    parts[vid].abort()
            elif vid in parts:
                parts[vid].commit()
            if errors[vid]:
                with self.store.open_part(ERRORS, vid, ERROR_SCHEMA) as w:
                    w.write(pa.Table.from_pylist(errors[vid], schema=ERROR_SCHEMA))
                summary.update(errors=len(errors[vid]), status="ok" if summary["clips"] else "failed")
        return list(summaries.values())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = self.embed_files([str(p) for p in batch["path"]])
        return {k: [r[k] for r in rows] for k in rows[0]}


def run(cfg: EmbedConfig) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from jobs.data import clip_files, clip_folder
    from jobs.tasks import served_config
    from pipelines.clipstore import ClipStore, location_name
    from pipelines.schema import CLIP_SCHEMA, embedding_schema

    fs, data = clip_folder(cfg.data)  # local, or a URI (s3://...): read through pyarrow.fs
    if cfg.batch_size < 1 or cfg.files_per_task < 1 or cfg.actors < 0:
        raise ValueError("--batch-size and --files-per-task must be >= 1, --actors >= 0")
    _, mcfg, settings = served_config(cfg.checkpoint, task="retrieval")
    files = sorted(clip_files(data, fs))
    carried = pa.schema([f for f in pq.read_schema(files[0], filesystem=fs) if f.name not in CLIP_SCHEMA.names])
    schema = embedding_schema(mcfg.embed_dim, carried)
    store = ClipStore(cfg.out, kind=EMBEDDINGS)
    if cfg.overwrite:
        store.clear()
    store.create()
    made_with = {"checkpoint": os.path.abspath(cfg.checkpoint), "checkpoint_sha1": checkpoint_id(cfg.checkpoint),
                 "dim": mcfg.embed_dim, "data": location_name(cfg.data), "clip_settings": settings.to_dict()}
    previous = store.read_json("_config.json")
    if previous is not None and (previous["checkpoint_sha1"], previous["dim"]) != (made_with["checkpoint_sha1"], made_with["dim"]):
        raise ValueError(f"{cfg.out} holds embeddings of another checkpoint ({previous['checkpoint']}); "
                         "use --overwrite or another --out")
    store.write_json("_config.json", made_with)
    store.remove_temporaries()
    done = store.done()
    pending = [f for f in files if os.path.basename(f)[: -len(".parquet")] not in done]
    log.info("%d clip file(s): %d already embedded, %d to embed", len(files), len(files) - len(pending), len(pending))

    t0 = time.perf_counter()
    started = False
    if not ray.is_initialized():
        ray.init(address=cfg.address or os.environ.get("RAY_ADDRESS"), include_dashboard=False)
        started = True
    rows: list[dict[str, Any]] = []
    try:
        if pending:
            import ray.data

            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = {"yes": True, "no": False}.get(cfg.use_gpu, gpus > 0)
            actors = cfg.actors or (max(1, gpus) if use_gpu else max(1, int(ray.cluster_resources().get("CPU", 1))))
            # a block of up to --files-per-task files is one call (batch_size=None: a block is a batch),
            # and at least one block per actor so that a small job keeps every actor busy
            blocks = max(-(-len(pending) // cfg.files_per_task), min(len(pending), actors))
            ds = ray.data.from_items([{"path": f} for f in pending], override_num_blocks=blocks)
            out = ds.map_batches(Embedder, batch_size=None, batch_format="numpy", concurrency=actors,
                                 num_gpus=1 if use_gpu else 0, num_cpus=0 if use_gpu else 1,
                                 fn_constructor_kwargs={"checkpoint": os.path.abspath(cfg.checkpoint), "store": store,
                                                        "schema": schema, "batch_size": cfg.batch_size,
                                                        "filesystem": fs})
            last = time.perf_counter()
            for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows.extend(batch.to_pylist())
                if time.perf_counter() - last > 10:
                    last = time.perf_counter()
                    log.info("%d/%d files, %d clips", len(rows), len(pending), sum(r["clips"] for r in rows))
    finally:
        if started:
            ray.shutdown()
    wall = time.perf_counter() - t0
    clips = sum(r["clips"] for r in rows)
    summary = {"run": {"files": len(files), "files_embedded": sum(r["status"] == "ok" for r in rows),
                       "files_failed": sum(r["status"] == "failed" for r in rows),
                       "files_skipped_done": len(files) - len(pending) + sum(r["status"] == "skipped" for r in rows),
                       "clips": clips, "clip_errors": sum(r["errors"] for r in rows), "wall_seconds": round(wall, 3),
                       "clips_per_second": round(clips / wall, 1) if wall else 0.0},
               "out": {"clips": store.count_rows(store.list_parts(EMBEDDINGS).values()),
                       "files": len(store.list_parts(EMBEDDINGS)), "dim": mcfg.embed_dim}}
    store.write_json("summary.json", summary)
    r, o = summary["run"], summary["out"]
    print(f"avray embed: {r['files']} file(s): {r['files_embedded']} embedded, {r['files_failed']} failed, "
          f"{r['files_skipped_done']} already done; {r['clips']} clips in {r['wall_seconds']:.1f} s "
          f"({r['clips_per_second']:.1f} clips/s), {r['clip_errors']} error row(s)")
    print(f"  {cfg.out}: {o['clips']} clips of {o['files']} file(s), {o['dim']}-d vectors in {store.path(EMBEDDINGS)}")
    print(f"  search: avray search {cfg.out} --text \"...\"")
    return 0


CONFIG = EmbedConfig
