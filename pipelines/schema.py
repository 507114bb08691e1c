"""The clip and error tables: one schema, defined here and nowhere else.

Tensors are stored as raw little-endian bytes in a `binary` column plus an `<name>_shape`
column (`list<int32>`): pyarrow writes a binary column at ~1,100 MB/s but a nested
`fixed_size_list` at ~85 MB/s (measured, DESIGN.md), and Ray Data would otherwise store a
numpy column as `large_list<uint8>`. Any Parquet reader can read the table; `decode_tensor`
and `decode_clip_batch` turn the blobs back into arrays.

Clip row (`OUT/clips/*.parquet`):

| column | type | meaning |
|---|---|---|
| video_id | string | 16 hex chars, sha1 of the resolved source path; a manifest segment's: 8 of those + 8 of sha1(`<path>#t=<start>,<end>`) (`pipelines.sources.source_id`) |
| clip_id | string | `<video_id>-<clip_index:05d>` |
| source_path | string | resolved path of the input file |
| clip_index | int32 | 0-based index of the clip within the file (within the segment, for a segment) |
| start_s, end_s | float64 | clip span in media seconds (from the container start) |
| fps | float32 | frame sampling rate of `frames` |
| sample_rate | int32 | sampling rate of `audio` |
| frames | binary | uint8 (T, H, W, 3) RGB |
| frames_shape | list<int32> | [T, H, W, 3] |
| audio | binary | float32 (S,) mono, silence when `has_audio` is false |
| audio_shape | list<int32> | [S] |
| logmel | binary | float32 (M, N) log-mel spectrogram of `audio` |
| logmel_shape | list<int32> | [M, N] |
| has_audio | bool | the file has an audio stream |
| video_stream, audio_stream | int16 | stream indices used (-1: none) |
| src_width, src_height | int32 | displayed size of the source video (after rotation) |
| src_fps | float32 | average frame rate of the source video stream (0 if unknown) |
| rotation | int16 | rotation applied from the stream's display matrix (degrees) |
| resize | string | how frames were fitted to H x W: crop (centre crop) or letterbox (padded) |
| *carried* | any | every other manifest column, same value on each clip of the file |

Embedding row (`EMB/embeddings/*.parquet`, written by `avray embed`, one per clip):

| column | type | meaning |
|---|---|---|
| clip_id, video_id, source_path, clip_index, start_s, end_s | as in the clip row | which clip, where |
| caption | string (null: unknown) | the clip's caption: its scene's ground truth for its span, or the manifest's `caption` |
| video_emb, audio_emb | fixed_size_list<float32>[D] | the clip's picture and sound in the joint space, unit norm |
| emb | fixed_size_list<float32>[D] | the clip embedding, L2(video_emb + audio_emb) |
| *carried* | any | the clip table's manifest columns |

Embeddings are plain fixed-size float32 lists, so pyarrow, pandas, duckdb and FAISS read them as
(N, D) arrays (`pyarrow.Table.column("emb").combine_chunks().flatten().to_numpy().reshape(-1, D)`).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

SHAPE_TYPE = pa.list_(pa.int32())

# name -> numpy dtype of each tensor column (stored little-endian).
TENSOR_DTYPES: dict[str, np.dtype] = {
    "frames": np.dtype("uint8"),
    "audio": np.dtype("<f4"),
    "logmel": np.dtype("<f4"),
}

CLIP_SCHEMA = pa.schema([
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("source_path", pa.string(), nullable=False),
    pa.field("clip_index", pa.int32(), nullable=False),
    pa.field("start_s", pa.float64(), nullable=False),
    pa.field("end_s", pa.float64(), nullable=False),
    pa.field("fps", pa.float32(), nullable=False),
    pa.field("sample_rate", pa.int32(), nullable=False),
    pa.field("frames", pa.binary(), nullable=False),
    pa.field("frames_shape", SHAPE_TYPE, nullable=False),
    pa.field("audio", pa.binary(), nullable=False),
    pa.field("audio_shape", SHAPE_TYPE, nullable=False),
    pa.field("logmel", pa.binary(), nullable=False),
    pa.field("logmel_shape", SHAPE_TYPE, nullable=False),
    pa.field("has_audio", pa.bool_(), nullable=False),
    pa.field("video_stream", pa.int16(), nullable=False),
    pa.field("audio_stream", pa.int16(), nullable=False),
    pa.field("src_width", pa.int32(), nullable=False),
    pa.field("src_height", pa.int32(), nullable=False),
    pa.field("src_fps", pa.float32(), nullable=False),
    pa.field("rotation", pa.int16(), nullable=False),
    pa.field("resize", pa.string(), nullable=False),
])

# One row per input file that produced no clips.
ERROR_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("video_id", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),        # missing | segment | open | probe | decode | spectrogram | write | worker
    pa.field("error_type", pa.string(), nullable=False),   # exception class name, e.g. InvalidDataError
    pa.field("message", pa.string(), nullable=False),
])


EMBEDDING_COLUMNS = ("video_emb", "audio_emb", "emb")


def embedding_schema(dim: int, carried: pa.Schema | None = None) -> pa.Schema:
    """The embedding table of D = `dim` vectors, followed by the carried manifest columns."""
    vec = pa.list_(pa.float32(), dim)
    fields = [CLIP_SCHEMA.field(n) for n in ("clip_id", "video_id", "source_path", "clip_index", "start_s", "end_s")]
    fields += [pa.field("caption", pa.string(), nullable=True)]
    fields += [pa.field(n, vec, nullable=False) for n in EMBEDDING_COLUMNS]
    carried = carried if carried is not None else pa.schema([])
    clash = sorted(set(carried.names) & {f.name for f in fields})
    return pa.schema(fields + [f for f in carried if f.name not in clash])


def vectors(table: pa.Table, column: str) -> "np.ndarray":
    """A fixed-size-list float32 column as a float32 (N, D) array (no copy when it has one chunk)."""
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


def clip_schema(carried: pa.Schema | None = None) -> pa.Schema:
    """The clip schema followed by the carried manifest columns (which may not shadow clip columns)."""
    if carried is None or len(carried) == 0:
        return CLIP_SCHEMA
    clash = sorted(set(carried.names) & set(CLIP_SCHEMA.names))
    if clash:
        raise ValueError(f"manifest column(s) {clash} collide with clip columns; rename them")
    return pa.schema(list(CLIP_SCHEMA) + list(carried))


def encode_tensor(name: str, array: np.ndarray) -> tuple[bytes, list[int]]:
    """Array -> (raw bytes, shape) for tensor column `name`; casts to the column's dtype."""
    a = np.ascontiguousarray(array, dtype=TENSOR_DTYPES[name])
    return a.tobytes(), list(a.shape)


def decode_tensor(name: str, blob: bytes | memoryview, shape: Iterable[int]) -> np.ndarray:
    """(raw bytes, shape) -> read-only array view of tensor column `name` (no copy)."""
    return np.frombuffer(blob, dtype=TENSOR_DTYPES[name]).reshape(tuple(int(s) for s in shape))


def decode_clip_batch(batch: Mapping[str, Any], frames: int | slice | None = None) -> dict[str, Any]:
    """Turn a columnar batch (dict of numpy arrays, as Ray Data's `map_batches` or
    `pyarrow.Table.to_pydict` give) into arrays: each tensor column present becomes a stacked
    array `(B, *shape)` when all rows share a shape, else a list of arrays; its `_shape`
    column is dropped. Other columns pass through unchanged. `frames`: an index or slice of each
    clip's frames (time axis) to keep; only those are copied out of the column.

    frames -> uint8 (B, T, H, W, 3) (with an index: (B, H, W, 3)); audio -> float32 (B, S);
    logmel -> float32 (B, M, N).
    """
    out = {k: v for k, v in batch.items() if not (k.endswith("_shape") and k[:-6] in TENSOR_DTYPES)}
    for name in TENSOR_DTYPES:
        if name not in batch:
            continue
        blobs, shapes = batch[name], batch[f"{name}_shape"]
        arrays = [decode_tensor(name, b, s) for b, s in zip(blobs, shapes)]
        if name == "frames" and frames is not None:
            arrays = [a[frames] for a in arrays]
        if arrays and all(a.shape == arrays[0].shape for a in arrays):
            out[name] = np.stack(arrays)
        else:
            out[name] = arrays
    return out


def numpy_batch(table: pa.Table) -> dict[str, Any]:
    """A pyarrow Table as the dict of numpy arrays Ray Data's `batch_format="numpy"` gives
    (ArrowBlockAccessor.to_numpy: each column's chunks combined, then
    `to_numpy(zero_copy_only=False)`): numbers become numeric arrays, string / list columns object
    arrays of str / arrays. Tensor columns (`TENSOR_DTYPES`) become object arrays of zero-copy
    memoryviews of the table's buffers where Ray Data gives bytes: a copy of every clip's frames
    saved (1.1 of 3.9 ms per 224-px clip for localization's read + prepare). `decode_clip_batch`
    takes either."""
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if name in TENSOR_DTYPES and pa.types.is_binary(col.type) and col.null_count == 0:
            out[name] = _binary_views(col)
        else:
            out[name] = col.combine_chunks().to_numpy(zero_copy_only=False)
    return out


def _binary_views(col: pa.ChunkedArray) -> np.ndarray:
    """A binary column without nulls -> object array of read-only memoryviews of its values (equal
    to the bytes), chunk by chunk: no copy, not even to combine the chunks; each view keeps its
    chunk's buffer alive."""
    out = np.empty(len(col), object)
    i = 0
    for chunk in col.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset: chunk.offset + len(chunk) + 1].tolist()
        data = memoryview(chunk.buffers()[2] if chunk.buffers()[2] is not None else b"").toreadonly()
        for a, b in zip(offsets[:-1], offsets[1:]):
            out[i] = data[a:b]
            i += 1
    return out


def error_row(path: str, video_id: str, stage: str, exc: BaseException | str) -> dict[str, str]:
    """One error-table row for a file that failed at `stage`."""
    if isinstance(exc, BaseException):
        return {"path": path, "video_id": video_id, "stage": stage,
                "error_type": type(exc).__name__, "message": str(exc) or repr(exc)}
    return {"path": path, "video_id": video_id, "stage": stage, "error_type": "Error", "message": exc}
