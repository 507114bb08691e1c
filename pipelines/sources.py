"""Turn the INPUT arguments of `avray preprocess` into a table of sources.

An input is a file, a folder (searched recursively for media extensions), a glob, or a
manifest (`.csv` / `.jsonl`) with a `path` column; a manifest's other columns are carried into
every clip row of that file. Relative manifest paths are resolved against the manifest's folder.
Each source gets a stable `video_id`: the first 16 hex characters of sha1(resolved path).
"""

from __future__ import annotations

import glob
import hashlib
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


def video_id(path: str) -> str:
    """Stable id of a source: sha1 of its resolved path, 16 hex chars."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


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


def read_manifest(path: Path) -> pa.Table:
    """A manifest as a table with a resolved string `path` column first."""
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
    return table.set_column(table.column_names.index("path"), "path", pa.array(paths, pa.string()))


def list_sources(inputs: Sequence[str]) -> pa.Table:
    """Sources table: `path` (string), `video_id` (string), then carried manifest columns.

    Files named directly are taken whatever their extension; folders and globs keep media
    extensions only. Duplicates (same resolved path) are kept once, first occurrence wins.
    Raises FileNotFoundError for a named file, folder or glob that matches nothing.
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
    seen: set[str] = set()
    keep = []
    for i, p in enumerate(table.column("path").to_pylist()):
        if p not in seen:
            seen.add(p)
            keep.append(i)
    table = table.take(keep)
    ids = pa.array([video_id(p) for p in table.column("path").to_pylist()], pa.string())
    return table.add_column(1, "video_id", ids)


def carried_schema(sources: pa.Table) -> pa.Schema:
    """Schema of the manifest columns carried into clip rows (everything but path / video_id)."""
    return pa.schema([f for f in sources.schema if f.name not in ("path", "video_id")])
