import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.sources import carried_schema, list_sources, video_id


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_folders_globs_files_and_dedup(tmp_path):
    a = _touch(tmp_path / "v" / "a.mp4")
    b = _touch(tmp_path / "v" / "sub" / "b.MKV")
    _touch(tmp_path / "v" / "notes.txt")
    c = _touch(tmp_path / "c.bin")  # named directly: taken whatever the extension
    t = list_sources([str(tmp_path / "v"), str(tmp_path / "v" / "*.mp4"), str(c)])
    assert t.column_names == ["path", "video_id"]
    assert t.column("path").to_pylist() == [str(a), str(b), str(c)]
    assert t.column("video_id").to_pylist() == [video_id(str(a)), video_id(str(b)), video_id(str(c))]
    assert all(len(v) == 16 for v in t.column("video_id").to_pylist())


def test_manifests_carry_columns_and_resolve_relative_paths(tmp_path):
    a = _touch(tmp_path / "m" / "a.mp4")
    b = _touch(tmp_path / "m" / "b.mp4")
    (tmp_path / "m" / "list.csv").write_text("path,label,split\na.mp4,3,train\nb.mp4,5,val\n")
    (tmp_path / "m" / "more.jsonl").write_text(json.dumps({"path": "a.mp4", "label": 9, "caption": "hi"}) + "\n")
    t = list_sources([str(tmp_path / "m" / "list.csv"), str(tmp_path / "m" / "more.jsonl")])
    assert t.column("path").to_pylist() == [str(a), str(b)]  # a.mp4 again in more.jsonl: first wins
    assert t.column("label").to_pylist() == [3, 5]
    assert t.column("split").to_pylist() == ["train", "val"]
    assert carried_schema(t).names == ["label", "split", "caption"]
    assert carried_schema(t).field("label").type == pa.int64()


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*nope.mp4"):
        list_sources([str(tmp_path / "nope.mp4")])
    with pytest.raises(FileNotFoundError, match="glob matches nothing"):
        list_sources([str(tmp_path / "*.webm")])
    (tmp_path / "bad.csv").write_text("file,label\na.mp4,1\n")
    with pytest.raises(ValueError, match="has no 'path' column"):
        list_sources([str(tmp_path / "bad.csv")])
