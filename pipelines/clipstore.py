"""The output folder of `avray preprocess` (and of `avray embed`): what is done, and writing it so
that reruns are safe.

    OUT/clips/<video_id>.parquet    all clip rows of one input file (one row group per batch)
    OUT/errors/<video_id>.parquet   the error row of one input file that gave no clips
    OUT/_config.json                decode + spectrogram settings and carried columns of OUT
    OUT/summary.json                counts of the last run and of OUT as a whole

`avray embed` writes the same layout with its parts under OUT/embeddings/ (`kind`).

Every part is written under a `.tmp-` name and renamed when complete, so a part file exists
only for a finished input: an interrupted run (Ctrl-C, a killed worker) leaves at most `.tmp-`
files, which readers skip (pyarrow ignores names starting with `.` or `_`) and the next run
deletes. "Done" is the existence of a part, which makes reruns skip finished inputs and never
duplicate rows. OUT may be a local path or any URI pyarrow.fs understands (s3://, gs://, ...).
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

CLIPS, ERRORS = "clips", "errors"
TMP_PREFIX = ".tmp-"


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) of a local path or a URI pyarrow.fs understands (s3://,
    gs://, ...): one rule for every folder avray reads or writes."""
    return pafs.FileSystem.from_uri(location) if "://" in location else (
        pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location)))


def location_name(location: str) -> str:
    """How a folder is recorded in summaries and configs: a URI as given, a local path absolute."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


@dataclass(frozen=True)
class ClipStore:
    """OUT, as a pyarrow filesystem and a root path on it (picklable: sent to Ray tasks); `kind`:
    the folder of its good parts (clips, or embeddings)."""

    uri: str
    kind: str = CLIPS

    @functools.cached_property
    def fs_root(self) -> tuple[pafs.FileSystem, str]:
        return filesystem(self.uri)

    def path(self, *parts: str) -> str:
        return "/".join([self.fs_root[1], *parts])

    def part_path(self, kind: str, vid: str) -> str:
        return self.path(kind, f"{vid}.parquet")

    def create(self) -> None:
        fs, _ = self.fs_root
        for kind in (self.kind, ERRORS):
            fs.create_dir(self.path(kind), recursive=True)

    def list_parts(self, kind: str) -> dict[str, str]:
        """video_id -> path of every finished part of `kind`."""
        fs, _ = self.fs_root
        sel = pafs.FileSelector(self.path(kind), allow_not_found=True)
        return {i.base_name[:-len(".parquet")]: i.path for i in fs.get_file_info(sel)
                if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                and not i.base_name.startswith((".", "_"))}

    def done(self) -> set[str]:
        """video_ids with a finished part of either kind (one listing per kind)."""
        return set(self.list_parts(self.kind)) | set(self.list_parts(ERRORS))

    def is_done(self, vid: str) -> bool:
        """Whether `vid` has a finished part, by looking up its two part paths (no listing)."""
        fs, _ = self.fs_root
        infos = fs.get_file_info([self.part_path(kind, vid) for kind in (self.kind, ERRORS)])
        return any(i.type == pafs.FileType.File for i in infos)

    def remove_temporaries(self) -> int:
        """Delete `.tmp-` files left by interrupted runs; return how many."""
        fs, _ = self.fs_root
        n = 0
        for kind in (self.kind, ERRORS):
            sel = pafs.FileSelector(self.path(kind), allow_not_found=True)
            for i in fs.get_file_info(sel):
                if i.base_name.startswith(TMP_PREFIX):
                    fs.delete_file(i.path)
                    n += 1
        return n

    def clear(self) -> None:
        """Delete everything avray wrote in OUT (for --overwrite)."""
        fs, _ = self.fs_root
        for kind in (self.kind, ERRORS):
            if fs.get_file_info(self.path(kind)).type == pafs.FileType.Directory:
                fs.delete_dir(self.path(kind))
        for name in ("_config.json", "summary.json"):
            if fs.get_file_info(self.path(name)).type == pafs.FileType.File:
                fs.delete_file(self.path(name))

    def open_part(self, kind: str, vid: str, schema: pa.Schema) -> "PartWriter":
        return PartWriter(self, kind, vid, schema)

    def write_error(self, row: dict[str, Any], schema: pa.Schema) -> None:
        with self.open_part(ERRORS, row["video_id"], schema) as w:
            w.write(pa.Table.from_pylist([row], schema=schema))

    def read_json(self, name: str) -> dict[str, Any] | None:
        fs, _ = self.fs_root
        if fs.get_file_info(self.path(name)).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(self.path(name)) as f:
            return json.loads(f.read().decode())

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        fs, _ = self.fs_root
        tmp = self.path(f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
        with fs.open_output_stream(tmp) as f:
            f.write((json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
        fs.move(tmp, self.path(name))

    def count_rows(self, paths: Iterable[str]) -> int:
        """Rows in the given parts, from their footers (no data read)."""
        fs, _ = self.fs_root
        return sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in paths)


class PartWriter:
    """Writes one part under a temporary name; `commit()` renames it into place, leaving the
    context without commit (an exception) deletes it."""

    def __init__(self, store: ClipStore, kind: str, vid: str, schema: pa.Schema) -> None:
        self.fs, _ = store.fs_root
        self.final = store.part_path(kind, vid)
        self.tmp = store.path(kind, f"{TMP_PREFIX}{vid}-{uuid.uuid4().hex[:8]}.parquet")
        self.writer = pq.ParquetWriter(self.tmp, schema, filesystem=self.fs)
        self.rows = 0
        self.committed = False

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> None:
        self.writer.close()
        self.fs.move(self.tmp, self.final)
        self.committed = True

    def __enter__(self) -> "PartWriter":
        return self

    def abort(self) -> None:
        """Delete the unfinished part."""
        self.writer.close()
        self.fs.delete_file(self.tmp)

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None and not self.committed:
            self.commit()
        elif not self.committed:
            self.abort()

