import numpy as np
import pyarrow as pa
import pytest

from pipelines.schema import (CLIP_SCHEMA, ERROR_SCHEMA, clip_schema, decode_clip_batch, decode_tensor,
                              encode_tensor, error_row)


def test_tensor_round_trip_exact():
    frames = np.random.default_rng(0).integers(0, 256, (5, 7, 9, 3), dtype=np.uint8)
    blob, shape = encode_tensor("frames", frames)
    assert shape == [5, 7, 9, 3] and len(blob) == 5 * 7 * 9 * 3
    np.testing.assert_array_equal(decode_tensor("frames", blob, shape), frames)
    audio = np.linspace(-1, 1, 33, dtype=np.float64)  # cast to the column's float32
    blob, shape = encode_tensor("audio", audio)
    back = decode_tensor("audio", blob, shape)
    assert back.dtype == np.float32 and shape == [33]
    np.testing.assert_array_equal(back, audio.astype(np.float32))


def test_clip_schema_columns_and_carried():
    assert CLIP_SCHEMA.field("frames").type == pa.binary()
    assert CLIP_SCHEMA.field("frames_shape").type == pa.list_(pa.int32())
    s = clip_schema(pa.schema([("label", pa.int64()), ("split", pa.string())]))
    assert s.names[-2:] == ["label", "split"] and len(s) == len(CLIP_SCHEMA) + 2
    with pytest.raises(ValueError, match=r"\['frames'\] collide with clip columns"):
        clip_schema(pa.schema([("frames", pa.string())]))


def test_decode_clip_batch_stacks_equal_shapes_and_lists_ragged():
    a, b = np.zeros((2, 3, 3, 3), np.uint8), np.ones((2, 3, 3, 3), np.uint8)
    mel = np.arange(6, dtype=np.float32).reshape(2, 3)
    batch = {"clip_id": np.array(["x", "y"]),
             "frames": [encode_tensor("frames", a)[0], encode_tensor("frames", b)[0]],
             "frames_shape": [[2, 3, 3, 3], [2, 3, 3, 3]],
             "logmel": [encode_tensor("logmel", mel)[0], encode_tensor("logmel", mel[:, :2])[0]],
             "logmel_shape": [[2, 3], [2, 2]]}
    out = decode_clip_batch(batch)
    assert set(out) == {"clip_id", "frames", "logmel"}
    assert out["frames"].shape == (2, 2, 3, 3, 3) and out["frames"][1].max() == 1
    assert isinstance(out["logmel"], list) and [m.shape for m in out["logmel"]] == [(2, 3), (2, 2)]


def test_error_row_from_exception():
    row = error_row("/x.mp4", "abc", "decode", ValueError("bad"))
    assert row == {"path": "/x.mp4", "video_id": "abc", "stage": "decode", "error_type": "ValueError", "message": "bad"}
    pa.Table.from_pylist([row], schema=ERROR_SCHEMA)  # fits the schema


def test_readme_documents_every_column():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [n for n in CLIP_SCHEMA.names + ERROR_SCHEMA.names if f"`{n}`" not in readme]
    assert missing == []
