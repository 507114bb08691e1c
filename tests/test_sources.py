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


def test_segments_are_sources_with_their_own_ids(tmp_path):
    from jobs.data import is_validation
    from pipelines.sources import source_id
    a = _touch(tmp_path / "a.mp4")
    b = _touch(tmp_path / "b.mp4")
    rows = [{"path": "a.mp4", "segment_start_s": 12, "segment_end_s": 20.0, "label": 1},
            {"path": "a.mp4", "segment_start_s": 20.0, "segment_end_s": None, "label": 2},
            {"path": "a.mp4", "segment_start_s": 12.0, "segment_end_s": 20, "label": 3},  # the first again: dropped
            {"path": "a.mp4", "label": 4},                                                # the whole file
            {"path": "a.mp4", "segment_start_s": 0, "label": 5},                          # 0 to the end: the same
            {"path": "b.mp4", "segment_end_s": 7.5, "label": 6}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t = list_sources([str(tmp_path / "m.jsonl"), str(b)])  # b named too: its whole file is another source
    assert t.column_names == ["path", "video_id", "segment_start_s", "segment_end_s", "label"]
    assert t.schema.field("segment_start_s").type == t.schema.field("segment_end_s").type == pa.float64()
    assert t.column("label").to_pylist() == [1, 2, 4, 6, None]
    assert t.column("segment_start_s").to_pylist() == [12.0, 20.0, None, None, None]
    assert t.column("segment_end_s").to_pylist() == [20.0, None, None, 7.5, None]
    ids = t.column("video_id").to_pylist()
    va, vb = video_id(str(a)), video_id(str(b))
    assert ids == [va[:8] + video_id(f"{a}#t=12.0,20.0")[:8], va[:8] + video_id(f"{a}#t=20.0")[:8], va,
                   vb[:8] + video_id(f"{b}#t=,7.5")[:8], vb]
    assert ids[:3] == [source_id(str(a), 12.0, 20.0), source_id(str(a), 20.0), source_id(str(a), 0.0, None)]
    assert len(set(ids)) == 5 and all(len(i) == 16 for i in ids)
    # the segments of a file fall on its side of the validation split
    assert len({is_validation(i, 0.5) for i in ids[:3]}) == 1 and len({is_validation(i, 0.5) for i in ids[3:]}) == 1
    # a CSV's empty cells are no bound; its numbers become float64 whatever pyarrow inferred
    (tmp_path / "m.csv").write_text("path,segment_start_s,segment_end_s\na.mp4,,\nb.mp4,2,4\n")
    t = list_sources([str(tmp_path / "m.csv")])
    assert t.column("video_id").to_pylist() == [va, source_id(str(b), 2.0, 4.0)]
    assert t.column("segment_start_s").to_pylist() == [None, 2.0] and t.schema.field("segment_end_s").type == pa.float64()


def test_malformed_manifest_rows_are_refused_with_their_line_numbers(tmp_path):
    _touch(tmp_path / "a.mp4")
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.mp4", "segment_start_s": 1}\n'
                 '{"path": "a.mp4", "segment_start_s": \n'
                 '["a.mp4"]\n'
                 '\n'
                 '{"label": 3}\n'
                 '{"path": "a.mp4", "segment_start_s": "12s", "segment_end_s": true}\n'
                 '{"path": 7, "segment_end_s": NaN}\n')
    with pytest.raises(ValueError) as e:
        list_sources([str(m)])
    assert str(e.value).splitlines() == [
        f"manifest {m} line 2: not JSON: Expecting value at column 38",
        f"manifest {m} line 3: not a JSON object: list",
        f"manifest {m} line 5: no 'path'",
        f"manifest {m} line 6: segment_start_s is not a number: '12s'",
        f"manifest {m} line 6: segment_end_s is not a number: True",
        f"manifest {m} line 7: not JSON: NaN is not JSON",
    ]
    c = tmp_path / "m.csv"
    c.write_text('path,label,segment_start_s\na.mp4,1,2.5\n"a\n.mp4",2,x\n,3,\na.mp4,4\n\na.mp4,5,inf\n')
    with pytest.raises(ValueError) as e:
        list_sources([str(c)])
    assert str(e.value).splitlines() == [
        f"manifest {c} line 3: segment_start_s is not a number: 'x'",  # a quoted path over lines 3-4
        f"manifest {c} line 5: no 'path'",
        f"manifest {c} line 6: 2 fields, the header has 3",
        f"manifest {c} line 8: segment_start_s is not a number: 'inf'",
    ]
    c.write_text("path,segment_end_s\n" + "".join(f"v{i}.mp4,end\n" for i in range(13)))
    with pytest.raises(ValueError) as e:
        list_sources([str(c)])
    lines = str(e.value).splitlines()
    assert len(lines) == 11 and lines[9] == f"manifest {c} line 11: segment_end_s is not a number: 'end'"
    assert lines[10] == f"manifest {c}: 3 more malformed row(s)"


def test_missing_files_in_a_manifest_are_sources_not_a_refusal(tmp_path):
    (tmp_path / "m.csv").write_text("path\ngone.mp4\n")
    t = list_sources([str(tmp_path / "m.csv")])  # ingest makes it an error row of stage "missing"
    assert t.column("path").to_pylist() == [str(tmp_path / "gone.mp4")]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):  # named on the command line: a typo
        list_sources([str(tmp_path / "gone.mp4")])
