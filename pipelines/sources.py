"""Turn the INPUT arguments of `avray preprocess` into a table of sources.

An input is a file, a folder (searched recursively for media extensions), a glob, or a
manifest (`.csv` / `.jsonl`) with a `path` column; a manifest's other columns are carried into
every clip row of that file. Relative manifest paths are resolved against the manifest's folder.

A manifest row may name a segment of its file, `segment_start_s` / `segment_end_s` (media
seconds; either empty / null: the file's start / end): only that span is ingested. A source is
a (file, segment) pair: several segments of one file are several sources.

Each source gets a stable `video_id` (`source_id`): a whole file (no segment, or one from 0 to
the end) the first 16 hex characters of sha1(resolved path), as always; a segment 8 of those
followed by 8 of sha1 of its W3C Media Fragments URI (`<path>#t=12.0,20.0`), so that each
segment has its own parts and clip ids and falls on its file's side of the validation split.

Malformed manifest rows (a JSONL line that is not a JSON object, a row without `path`, a
segment bound that is not a number) refuse the whole run before any work, each named by its
line number. Files a manifest lists but that are missing are not refused here: they become
error rows of stage `missing` when ingested.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson

MEDIA_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts", ".flv",
    ".wmv", ".3gp", ".ogv", ".ogg",
})
MANIFEST_EXTENSIONS = frozenset({".csv", ".jsonl"})
_GLOB_CHARS = set("*?[")
SEGMENT_COLUMNS = ("segment_start_s", "segment_end_s")
MAX_REPORTED = 10  # malformed manifest rows listed in the error, then a count


def video_id(path: str) -> str:
    """Stable id of a whole file: sha1 of its resolved path, 16 hex chars."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _bounds(start: float | None, end: float | None) -> tuple[float | None, float | None]:
    """A segment's bounds as floats, a start of 0 as None (the file's start)."""
    start = None if start is None or float(start) == 0.0 else float(start)
    return start, None if end is None else float(end)


def source_id(path: str, start: float | None = None, end: float | None = None) -> str:
    """Stable id of a source, 16 hex chars: `video_id(path)` for a whole file (no segment, or
    one from 0 to the end); for a segment, the first 8 of those and 8 of sha1 of
    `<path>#t=<start>,<end>` (Media Fragments; floats as `repr`, an absent bound left out)."""
    start, end = _bounds(start, end)
    if start is None and end is None:
        return video_id(path)
    fragment = "" if start is None else repr(start)
    if end is not None:
        fragment += f",{end!r}"
    return video_id(path)[:8] + video_id(f"{path}#t={fragment}")[:8]


def _resolve(path: str, base: Path | None = None) -> str:
    if "://" in path:
        return path
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return str(p.resolve())


def _walk(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files)
                     if os.path.splitext(f)[1].lower() in MEDIA_EXTENSIONS)
    return found


def _number(value: object) -> bool:
    """Whether a segment bound is a finite number or absent (JSON null / an empty CSV cell)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return True
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _row_problems(row: dict, line: int) -> list[tuple[int, str]]:
    """What is malformed in one manifest row (JSON values, or CSV strings)."""
    out = []
    p = row.get("path")
    if p is None or (isinstance(p, str) and not p.strip()):
        out.append((line, "no 'path'"))
    elif not isinstance(p, str):
        out.append((line, f"'path' is not a string: {p!r}"))
    out += [(line, f"{c} is not a number: {row[c]!r}") for c in SEGMENT_COLUMNS if c in row and not _number(row[c])]
    return out


def _jsonl_problems(path: Path) -> list[tuple[int, str]]:
    """(line number, what is wrong) of each malformed line of a JSONL manifest."""
    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    problems: list[tuple[int, str]] = []
    with open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                row = json.loads(text.rstrip("\r\n"), parse_constant=no_constant)
            except json.JSONDecodeError as e:
                problems.append((n, f"not JSON: {e.msg} at column {e.colno}"))
                continue
            except ValueError as e:
                problems.append((n, f"not JSON: {e}"))
                continue
            if not isinstance(row, dict):
                problems.append((n, f"not a JSON object: {type(row).__name__}"))
                continue
            problems += _row_problems(row, n)
    return problems


def _csv_problems(path: Path) -> list[tuple[int, str]]:
    """(line number, what is wrong) of each malformed row of a CSV manifest (the header is line
    1; a quoted value spanning lines counts them all; blank lines are skipped, as pyarrow does)."""
    problems: list[tuple[int, str]] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or "path" not in header:
            return []  # refused when read, with the columns it has
        last = reader.line_num
        for row in reader:
            n, last = last + 1, reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                problems.append((n, f"{len(row)} fields, the header has {len(header)}"))
                continue
            problems += _row_problems(dict(zip(header, row)), n)
    return problems


def _refuse(path: Path, problems: list[tuple[int, str]]) -> None:
    lines = [f"manifest {path} line {n}: {what}" for n, what in problems[:MAX_REPORTED]]
    if len(problems) > MAX_REPORTED:
        lines.append(f"manifest {path}: {len(problems) - MAX_REPORTED} more malformed row(s)")
    raise ValueError("\n".join(lines))


def read_manifest(path: Path) -> pa.Table:
    """A manifest as a table with a resolved string `path` column first and the segment
    columns, when there, as float64. Raises ValueError naming every malformed row (up to
    `MAX_REPORTED`) by its line number."""
    try:
        problems = _csv_problems(path) if path.suffix.lower() == ".csv" else _jsonl_problems(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"manifest {path} is not UTF-8 text: {e}") from e
    if problems:
        _refuse(path, problems)
    try:
        table = (pacsv.read_csv(path) if path.suffix.lower() == ".csv"
                 else pajson.read_json(path))
    except pa.ArrowInvalid as e:
        raise ValueError(f"cannot read manifest {path}: {e}") from e
    if "path" not in table.column_names:
        raise ValueError(f"manifest {path} has no 'path' column (columns: {table.column_names})")
    if table.num_rows == 0:
        return table.select(["path"]).cast(pa.schema([("path", pa.string())]))
    paths = [_resolve(str(p), path.parent) for p in table.column("path").to_pylist()]
    table = table.set_column(table.column_names.index("path"), "path", pa.array(paths, pa.string()))
    for c in SEGMENT_COLUMNS:
        if c in table.column_names:
            values = [None if v is None or (isinstance(v, str) and not v.strip()) else float(v)
                      for v in table.column(c).to_pylist()]
            table = table.set_column(table.column_names.index(c), c, pa.array(values, pa.float64()))
    return table


def list_sources(inputs: Sequence[str]) -> pa.Table:
    """Sources table: `path` (string), `video_id` (string, `source_id`), then carried manifest
    columns (the segment columns among them, float64).

    Files named directly are taken whatever their extension; folders and globs keep media
    extensions only. Duplicates (same resolved path and segment) are kept once, first occurrence
    wins. Raises FileNotFoundError for a file, folder or glob named on the command line that
    matches nothing (a typo); files a manifest lists are not checked here (missing ones become
    error rows of stage `missing`). Raises ValueError for malformed manifest rows.
    """
    tables: list[pa.Table] = []
    plain: list[str] = []
    for item in inputs:
        if _GLOB_CHARS & set(item) and "://" not in item:
            matches = sorted(glob.glob(os.path.expanduser(item), recursive=True))
            if not matches:
                raise FileNotFoundError(f"glob matches nothing: {item}")
            for m in matches:
                plain.extend(_walk(Path(m)) if os.path.isdir(m) else
                             [m] if os.path.splitext(m)[1].lower() in MEDIA_EXTENSIONS else [])
            continue
        p = Path(item).expanduser()
        if "://" in item:
            plain.append(item)
        elif p.is_dir():
            plain.extend(_walk(p))
        elif p.suffix.lower() in MANIFEST_EXTENSIONS and p.is_file():
            if plain:
                tables.append(pa.table({"path": [_resolve(x) for x in plain]}))
                plain = []
            tables.append(read_manifest(p))
        elif p.exists():
            plain.append(item)
        else:
            raise FileNotFoundError(f"no such file or folder: {item}")
    if plain:
        tables.append(pa.table({"path": pa.array([_resolve(x) for x in plain], pa.string())}))
    if not tables:
        return pa.table({"path": pa.array([], pa.string()), "video_id": pa.array([], pa.string())})
    table = pa.concat_tables(tables, promote_options="permissive")
    paths = table.column("path").to_pylist()
    none = [None] * table.num_rows
    bounds = zip(*(table.column(c).to_pylist() if c in table.column_names else none for c in SEGMENT_COLUMNS))
    seen: set[tuple[str, float | None, float | None]] = set()
    keep, ids = [], []
    for i, (p, (start, end)) in enumerate(zip(paths, bounds)):
        key = (p, *_bounds(start, end))
        if key not in seen:
            seen.add(key)
            keep.append(i)
            ids.append(source_id(p, start, end))
    return table.take(keep).add_column(1, "video_id", pa.array(ids, pa.string()))


def carried_schema(sources: pa.Table) -> pa.Schema:
    """Schema of the manifest columns carried into clip rows (everything but path / video_id)."""
    return pa.schema([f for f in sources.schema if f.name not in ("path", "video_id")])
