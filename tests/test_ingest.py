"""`avray preprocess` on a local Ray: generated scenes + real videos + a corrupted corpus.

Exact clip counts per good file, exactly the bad files in errors, carried manifest columns,
an identical second run, and no partial file counted as done.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.preprocess import PreprocessConfig, record_lost_files, run
from pipelines.clipstore import CLIPS, ClipStore
from pipelines.schema import CLIP_SCHEMA, ERROR_SCHEMA, decode_clip_batch
from pipelines.sources import video_id
from tests import mediagen
from tests.conftest import SHARED_MEDIA

pytestmark = pytest.mark.slow

OPTS = dict(clip_seconds=1.0, fps=4.0, size=32)
# real videos in ../shared/media/video -> whole 1 s clips (last clip may end half a frame late)
SHARED_CLIPS = {"grid_bbaf2n.mpg": 3, "grid_lwbsza.mpg": 3, "kinetics_test.avi": 6, "nasa_13013.mp4": 13,
                "no_duration.webm": 5, "big_buck_bunny_0_30.webm": 30}
# damaged copies of a good 4 s mp4, and what stops each (see tests/mediagen.py)
BAD = {"truncated_10.mp4": "open", "truncated_50.mp4": "open", "truncated_90.mp4": "open",
       "header_flipped.mp4": "open", "empty.mp4": "open", "text.mp4": "open", "flipped.mp4": "probe"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("corpus")
    expected: dict[str, int] = {}
    assert main(["synth", "--out", str(root / "scenes"), "--videos", "3", "--seed", "7", "--seconds", "3",
                 "--size", "64", "--fps", "10"]) == 0
    for i in range(3):
        expected[str(root / "scenes" / f"scene_{i:05d}.mp4")] = 3
    # the scenes through a manifest whose columns are carried into every clip row
    rows = ["path,label,split"] + [f"scene_{i:05d}.mp4,{i * 10},{'val' if i == 2 else 'train'}" for i in range(3)]
    (root / "scenes" / "manifest.csv").write_text("\n".join(rows) + "\n")
    mediagen.write_video(root / "edge" / "mute.mp4", seconds=2.0, audio=False)
    mediagen.write_video(root / "edge" / "vfr.mkv", seconds=3.0, vfr=True)
    mediagen.write_video(root / "edge" / "rotated.mp4", seconds=2.0, rotation=90)
    expected.update({str(root / "edge" / "mute.mp4"): 2, str(root / "edge" / "vfr.mkv"): 3,
                     str(root / "edge" / "rotated.mp4"): 2})
    mediagen.write_video(root / "edge" / "short.mp4", seconds=0.5)  # shorter than a clip: an error row
    good = mediagen.write_video(root / "good.mp4", seconds=4.0)
    mediagen.make_corrupt_corpus(good, root / "bad")
    if SHARED_MEDIA.is_dir():
        for name, n in SHARED_CLIPS.items():
            shutil.copy(SHARED_MEDIA / "video" / name, root / "edge" / name)
            expected[str(root / "edge" / name)] = n
    return root, expected


def _cfg(root: Path, out: Path, **kw) -> PreprocessConfig:
    return PreprocessConfig(inputs=(str(root / "scenes" / "manifest.csv"), str(root / "edge"), str(root / "bad")),
                            out=str(out), **OPTS, **kw)


def _clips(out: Path) -> pa.Table:
    return pq.read_table(out / "clips").sort_by("clip_id")


def test_preprocess_counts_errors_and_idempotent_rerun(ray_local, corpus, tmp_path, capsys):
    root, expected = corpus
    out = tmp_path / "out"
    assert run(_cfg(root, out)) == 0
    printed = capsys.readouterr().out
    table = _clips(out)

    # exact clips per good file, and the clip schema plus the carried columns
    counts = dict(zip(*np.unique(table.column("source_path").to_numpy(zero_copy_only=False), return_counts=True)))
    assert counts == expected
    assert table.schema.names == CLIP_SCHEMA.names + ["label", "split"]
    assert len(set(table.column("clip_id").to_pylist())) == table.num_rows
    scenes = table.filter(pa.compute.starts_with(table.column("source_path"), str(root / "scenes")))
    assert sorted(set(zip(scenes.column("label").to_pylist(), scenes.column("split").to_pylist()))) == [
        (0, "train"), (10, "train"), (20, "val")]
    edge = table.filter(pa.compute.is_null(table.column("label")))
    assert edge.num_rows == sum(n for p, n in expected.items() if "/scenes/" not in p)

    # exactly the bad files in errors, with the stage that refused them
    errors = pq.read_table(out / "errors")
    assert errors.schema == ERROR_SCHEMA
    got = {Path(p).name: s for p, s in zip(errors.column("path").to_pylist(), errors.column("stage").to_pylist())}
    assert got == {**BAD, "short.mp4": "decode"}
    short = errors.filter(pa.compute.ends_with(errors.column("path"), "short.mp4")).to_pylist()[0]
    assert short["error_type"] == "TooShort" and short["video_id"] == video_id(str(root / "edge" / "short.mp4"))
    assert short["message"] == "0.52 s of video is shorter than one 1 s clip"
    types = dict(zip([Path(p).name for p in errors.column("path").to_pylist()], errors.column("error_type").to_pylist()))
    assert types["empty.mp4"] == types["truncated_50.mp4"] == "UnreadableMedia"
    assert types["flipped.mp4"] == "NoVideoStream"

    # per-row contents: shapes, A/V metadata
    b = decode_clip_batch(table.slice(0, 4).to_pydict())
    assert b["frames"].shape == (4, 4, 32, 32, 3) and b["audio"].shape == (4, 16000)
    assert b["logmel"].shape == (4, 64, 101)
    mute = table.filter(pa.compute.ends_with(table.column("source_path"), "mute.mp4"))
    assert mute.column("has_audio").to_pylist() == [False, False]
    assert mute.column("audio_stream").to_pylist() == [-1, -1]
    rot = table.filter(pa.compute.ends_with(table.column("source_path"), "rotated.mp4")).to_pylist()[0]
    assert (rot["rotation"], rot["src_width"], rot["src_height"]) == (90, 64, 96)

    summary = json.loads((out / "summary.json").read_text())
    n_bad = len(BAD) + 1
    assert summary["run"]["files_ok"] == len(expected) and summary["run"]["files_failed"] == n_bad
    assert summary["run"]["clips"] == table.num_rows == summary["out"]["clips"]
    assert f"{len(expected) + n_bad} file(s): {len(expected)} ok, {n_bad} failed, 0 already done" in printed

    # a second run skips everything and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    assert run(_cfg(root, out)) == 0
    assert f"{len(expected)} ok" not in capsys.readouterr().out
    again = json.loads((out / "summary.json").read_text())
    assert again["run"]["files_skipped_done"] == len(expected) + n_bad and again["run"]["clips"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before
    assert _clips(out).equals(table)

    # other settings into the same OUT are refused; --overwrite starts over
    with pytest.raises(ValueError, match=r"other settings \{'fps': \(4\.0, 8\.0\)\}"):
        run(PreprocessConfig(**{**_cfg(root, out).__dict__, "fps": 8.0}))
    with pytest.raises(ValueError, match=r"other settings \{'keyframes_only': \(None, True\)\}"):
        run(PreprocessConfig(**{**_cfg(root, out).__dict__, "keyframes_only": True}))
    assert run(_cfg(root, out, overwrite=True)) == 0
    assert _clips(out).equals(table)


def test_interrupted_run_leaves_nothing_counted_as_done(ray_local, corpus, tmp_path):
    root, expected = corpus
    out = tmp_path / "out"
    scene = str(root / "scenes" / "scene_00000.mp4")
    assert run(PreprocessConfig(inputs=(scene,), out=str(out), **OPTS)) == 0
    # what a killed run leaves: an unfinished part of another file under its temporary name
    store = ClipStore(str(out))
    other = str(root / "scenes" / "scene_00001.mp4")
    w = store.open_part(CLIPS, video_id(other), CLIP_SCHEMA)
    w.writer.write_table(pq.read_table(out / "clips").slice(0, 1))
    w.writer.close()
    assert sorted(store.list_parts(CLIPS)) == [video_id(scene)]  # the tmp part is not "done"
    assert store.done() == {video_id(scene)} and store.is_done(video_id(scene)) and not store.is_done(video_id(other))
    assert pq.read_table(out / "clips").num_rows == 3          # and readers skip it
    assert run(PreprocessConfig(inputs=(scene, other), out=str(out), **OPTS)) == 0
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(
        [f"{video_id(scene)}.parquet", f"{video_id(other)}.parquet"])
    assert pq.read_table(out / "clips").num_rows == 6


def test_clips_read_back_with_ray_data(ray_local, corpus, tmp_path):
    import ray.data

    root, _ = corpus
    out = tmp_path / "out"
    # the manifest `avray synth` writes carries caption and ground truth into every clip row
    assert run(PreprocessConfig(inputs=(str(root / "scenes" / "manifest.jsonl"),), out=str(out), **OPTS)) == 0
    ds = ray.data.read_parquet(str(out / "clips")).map_batches(decode_clip_batch, batch_size=4)
    batches = list(ds.iter_batches(batch_size=9, batch_format="numpy"))
    assert [b["frames"].shape for b in batches] == [(9, 4, 32, 32, 3)]
    assert batches[0]["logmel"].dtype == np.float32 and batches[0]["audio"].shape == (9, 16000)
    b = batches[0]
    for src, cap, gt in zip(b["source_path"], b["caption"], b["ground_truth"]):
        truth = json.loads(gt)
        assert Path(src).name == truth["video"] and cap == truth["caption"]


def test_files_whose_task_died_become_error_rows(tmp_path):
    from pipelines.sources import list_sources
    files = [mediagen.write_video(tmp_path / f"{n}.mp4", seconds=1.0) for n in ("done", "lost", "committed")]
    pending = list_sources([str(f) for f in files])
    store = ClipStore(str(tmp_path / "out"))
    store.create()
    ids = pending.column("video_id").to_pylist()
    with store.open_part(CLIPS, ids[2], CLIP_SCHEMA):  # committed its part, then died before reporting
        pass
    lost = record_lost_files(pending, [{"video_id": ids[0]}], store)
    assert [(r["path"], r["stage"], r["status"], r["clips"]) for r in lost] == [(str(files[1]), "worker", "failed", 0)]
    errors = pq.read_table(tmp_path / "out" / "errors").to_pylist()
    assert errors == [{"path": str(files[1]), "video_id": ids[1], "stage": "worker", "error_type": "Error",
                       "message": "the task processing this file died or failed; see the Ray logs"}]


def test_tasks_and_decoder_threads_follow_the_files_and_cpus():
    from pipelines.ingest import plan_tasks
    assert plan_tasks(8, [2]) == (4, 1)       # 2 blocks per CPU, one decoder thread each
    assert plan_tasks(1000, [2]) == (126, 1)  # at most 8 files a block, a multiple of the CPUs
    assert plan_tasks(34, [2]) == (6, 1)
    assert plan_tasks(100, [16]) == (32, 1)
    assert plan_tasks(2, [2]) == (2, 1)
    assert plan_tasks(1, [16]) == (1, 16)     # one long file: all the CPUs decode it
    assert plan_tasks(1, [32]) == (1, 16)     # at most MAX_DECODE_THREADS
    assert plan_tasks(1, [16], free_cpus=14) == (1, 14)  # another job holds 2 CPUs: never wait for them
    assert plan_tasks(1, [16], free_cpus=0) == (1, 1)
    assert plan_tasks(3, [16]) == (3, 5)
    assert plan_tasks(5, [8, 8, 8, 8]) == (5, 4)  # 2 tasks a node, all 5 at once (6 threads: 4 at a time)


def test_decoder_threads_use_frame_threading_and_give_the_same_clips(tmp_path):
    import av

    from pipelines.decode import DecodeConfig, MediaReader
    path = mediagen.write_video(tmp_path / "v.mp4", seconds=3.0, width=320, height=240)
    out = {}
    for threads in (1, 3):
        with MediaReader(str(path), DecodeConfig(size=64, fps=5, threads=threads, seek="never")) as r:
            assert r.video.codec_context.thread_count == threads
            assert r.video.codec_context.thread_type == (av.codec.context.ThreadType.AUTO if threads > 1
                                                         else av.codec.context.ThreadType.SLICE)
            out[threads] = list(r.clips())
    assert len(out[1]) == len(out[3]) == 1
    assert np.array_equal(out[1][0].frames, out[3][0].frames) and np.array_equal(out[1][0].audio, out[3][0].audio)


def test_balanced_blocks_deal_largest_first_in_snake_order(tmp_path):
    from pipelines.ingest import balanced_blocks
    from pipelines.sources import list_sources
    for size in range(1, 11):
        (tmp_path / f"f{size:02d}.mp4").write_bytes(b"x" * size)
    blocks = balanced_blocks(list_sources([str(tmp_path)]), 3)
    sizes = [[int(Path(p).stem[1:]) for p in b.column("path").to_pylist()] for b in blocks]
    assert sizes == [[10, 5, 4], [9, 6, 3], [8, 7, 2, 1]]


def test_segments_missing_files_and_bad_segments_per_source(ray_local, tmp_path, capsys):
    """A manifest's segments of one file are separate sources: clips in the file's times, parts,
    error rows and reruns of their own; a missing download is stage `missing`."""
    from pipelines.sources import source_id
    media = tmp_path / "media"
    v = str(mediagen.write_video(media / "long.mp4", seconds=10.0, video_options={"g": "25"}))
    gone = str(media / "gone.mp4")
    rows = [{"path": "long.mp4", "segment_start_s": 2.0, "segment_end_s": 5.0, "speaker": "a"},
            {"path": "long.mp4", "segment_start_s": 6.5, "segment_end_s": None, "speaker": "b"},
            {"path": "long.mp4", "segment_start_s": 8.0, "segment_end_s": 12.0, "speaker": "c"},  # past the end
            {"path": "long.mp4", "segment_start_s": 5.0, "segment_end_s": 4.0, "speaker": "d"},   # empty
            {"path": "gone.mp4", "segment_start_s": 1.0, "segment_end_s": 3.0, "speaker": "e"},   # not downloaded
            {"path": "gone.mp4", "speaker": "f"},
            {"path": "long.mp4", "segment_start_s": 9.5, "speaker": "h"}]  # under a clip before the end
    manifest = media / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = PreprocessConfig(inputs=(str(manifest),), out=str(out), **OPTS)
    assert run(cfg) == 0
    assert "7 file(s): 2 ok, 5 failed, 0 already done" in capsys.readouterr().out
    ids = {r["speaker"]: source_id(r["path"].replace("long.mp4", v).replace("gone.mp4", gone),
                                   r.get("segment_start_s"), r.get("segment_end_s")) for r in rows}
    table = _clips(out)
    assert table.schema.names == CLIP_SCHEMA.names + ["segment_start_s", "segment_end_s", "speaker"]
    got = sorted(zip(table.column("speaker").to_pylist(), table.column("video_id").to_pylist(),
                     table.column("clip_id").to_pylist(), table.column("start_s").to_pylist(),
                     table.column("end_s").to_pylist(), table.column("source_path").to_pylist()))
    assert got == sorted([("a", ids["a"], f"{ids['a']}-{k:05d}", 2.0 + k, 3.0 + k, v) for k in range(3)]
                         + [("b", ids["b"], f"{ids['b']}-{k:05d}", 6.5 + k, 7.5 + k, v) for k in range(3)])
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted([f"{ids['a']}.parquet", f"{ids['b']}.parquet"])
    errors = {r["video_id"]: (r["path"], r["stage"], r["error_type"], r["message"])
              for r in pq.read_table(out / "errors").to_pylist()}
    assert errors == {
        ids["c"]: (v, "segment", "BadSegment", "segment 8 to 12 s ends past the end of the video (10.00 s)"),
        ids["d"]: (v, "segment", "BadSegment", "segment 5 to 4 s: segment_end_s is not after segment_start_s"),
        ids["e"]: (gone, "missing", "MissingFile", f"segment 1 to 3 s: no such file: {gone}"),
        ids["f"]: (gone, "missing", "MissingFile", f"no such file: {gone}"),
        ids["h"]: (v, "decode", "TooShort", "segment from 9.5 s: 0.50 s of video is shorter than one 1 s clip"),
    }
    assert ids["f"] == video_id(gone)  # a whole file keeps its id

    # a rerun skips every segment; a segment added to the manifest is the only one processed
    with manifest.open("a") as f:
        f.write(json.dumps({"path": "long.mp4", "segment_start_s": 0, "segment_end_s": 2, "speaker": "g"}) + "\n")
    assert run(cfg) == 0
    summary = json.loads((out / "summary.json").read_text())["run"]
    assert (summary["files"], summary["files_ok"], summary["files_skipped_done"], summary["clips"]) == (8, 1, 7, 2)
    g = _clips(out).filter(pa.compute.equal(pa.compute.field("speaker"), "g"))
    assert g.column("start_s").to_pylist() == [0.0, 1.0]
    assert g.column("video_id").to_pylist() == [source_id(v, 0.0, 2.0)] * 2 != [video_id(v)] * 2
