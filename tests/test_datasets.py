"""Dataset adapters (`avray manifest`): tiny datasets in each published metadata format, files
named as each dataset names them, exact manifest rows; two of them through `avray preprocess`;
VGG-SS-style boxes scored by the localization task's own cIoU."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipelines.datasets import build, flickr_boxes, read_audioset_labels
from tests.mediagen import write_video


def _video(path: Path, seconds: float = 2.0, size: int = 64) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, seconds=seconds, width=size, height=size, fps=10.0)
    return str(path.resolve())


def _touch(path: Path) -> str:  # a listed file that exists (its content is not read by the adapters)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path.resolve())


def test_vggsound_rows_missing_files_and_bad_lines(tmp_path, caplog):
    root = tmp_path / "videos"
    a = _touch(root / "--PJHxphWEs_000030.mp4")
    meta = tmp_path / "vggsound.csv"
    meta.write_text("--PJHxphWEs,30,people marching,train\n"
                    "0Bkn8eZhZGQ,4,\"dog barking, growling\",test\n"
                    "broken,row\n"
                    "\n"
                    "x1234567890,-3,dog,train\n"
                    "y1234567890,abc,dog,train\n")
    m = build("vggsound", str(meta), str(root))
    assert m.rows == [
        {"path": a, "dataset": "vggsound", "youtube_id": "--PJHxphWEs", "label": "people marching", "split": "train",
         "youtube_start_s": 30.0, "youtube_end_s": 40.0},
        {"path": str((root / "0Bkn8eZhZGQ_000004.mp4").resolve()), "dataset": "vggsound", "youtube_id": "0Bkn8eZhZGQ",
         "label": "dog barking, growling", "split": "test", "youtube_start_s": 4.0, "youtube_end_s": 14.0}]
    assert m.missing == [m.rows[1]["path"]]
    assert m.skipped == [(f"{meta}:3", "expected 4 fields youtube_id,start_seconds,label,split, got 2"),
                         (f"{meta}:5", "start_seconds must be a number >= 0, got '-3'"),
                         (f"{meta}:6", "start_seconds must be a number >= 0, got 'abc'")]
    assert f"{meta}:3: skipped" in caplog.text
    # untrimmed videos: the span becomes the segment that preprocess ingests
    full = build("vggsound", str(meta), str(root), pattern="{ytid}.mp4", trimmed=False)
    assert full.rows[0] == {"path": str((root / "--PJHxphWEs.mp4").resolve()), "dataset": "vggsound",
                            "youtube_id": "--PJHxphWEs", "label": "people marching", "split": "train",
                            "segment_start_s": 30.0, "segment_end_s": 40.0}
    assert full.missing == [str((root / "--PJHxphWEs.mp4").resolve()), str((root / "0Bkn8eZhZGQ.mp4").resolve())]
    with pytest.raises(ValueError, match=rf"^{meta}:3: expected 4 fields"):
        build("vggsound", str(meta), str(root), strict=True)


def test_avspeech_trimmed_downloads_untrimmed_segments_and_face_centre(tmp_path):
    meta = tmp_path / "avspeech_test.csv"
    meta.write_text("AvWWVOgaMlk,90.000000,93.566667,0.586719,0.311111\n"
                    "AvWWVOgaMlk,100.5,104,0.5,0.5\n"
                    "bad_face_xx,1,2,1.5,0.2\n")
    # AVSpeechDownloader's naming: <ytid>/<ytid>_<start>_<end>_video.mp4, times as the CSV writes them
    a = _touch(tmp_path / "AvWWVOgaMlk" / "AvWWVOgaMlk_90.000000_93.566667_video.mp4")
    m = build("avspeech", str(meta), str(tmp_path))
    assert m.rows == [
        {"path": a, "dataset": "avspeech", "youtube_id": "AvWWVOgaMlk", "face_x": 0.586719, "face_y": 0.311111,
         "youtube_start_s": 90.0, "youtube_end_s": 93.566667},
        {"path": str((tmp_path / "AvWWVOgaMlk" / "AvWWVOgaMlk_100.5_104_video.mp4").resolve()), "dataset": "avspeech",
         "youtube_id": "AvWWVOgaMlk", "face_x": 0.5, "face_y": 0.5, "youtube_start_s": 100.5, "youtube_end_s": 104.0}]
    assert m.missing == [m.rows[1]["path"]] and m.skipped == [(f"{meta}:3", "face centre (1.5, 0.2) is not in [0, 1]")]
    # whole YouTube videos: two segments of one file
    full = _touch(tmp_path / "AvWWVOgaMlk.mp4")
    u = build("avspeech", str(meta), str(tmp_path), pattern="{ytid}.mp4", trimmed=False)
    assert [(r["path"], r["segment_start_s"], r["segment_end_s"]) for r in u.rows] == [
        (full, 90.0, 93.566667), (full, 100.5, 104.0)]
    assert u.missing == []
    with pytest.raises(ValueError, match=r"^--pattern '\{ytid\}_\{nope\}.mp4' names \['nope'\]; avspeech file names can use"):
        build("avspeech", str(meta), str(tmp_path), pattern="{ytid}_{nope}.mp4")
    # a row whose times do not fit the pattern's format is skipped with its line
    odd = build("avspeech", str(meta), str(tmp_path), pattern="{ytid}_{start:06d}.mp4")
    assert [r["path"] for r in odd.rows] == [str((tmp_path / "AvWWVOgaMlk_000090.mp4").resolve())]
    assert odd.skipped[0] == (f"{meta}:2", "file pattern '{ytid}_{start:06d}.mp4' does not fit this row: "
                                           "ValueError: Unknown format code 'd' for object of type 'float'")


def test_kinetics_label_folders_flat_files_and_test_split(tmp_path):
    meta = tmp_path / "train.csv"
    meta.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                    "abseiling,--GkrdYZ9Tc,0,10,train,0\n"
                    "air drumming,--nQbRBEz2s,104,114,train,1\n"
                    "zumba,missingvid0,5,15,train,0\n"
                    "zumba,badtimes000,20,10,train,0\n")
    a = _touch(tmp_path / "k" / "abseiling" / "--GkrdYZ9Tc_000000_000010.mp4")
    b = _touch(tmp_path / "k" / "--nQbRBEz2s_000104_000114.mp4")  # flat layout
    m = build("kinetics", str(meta), str(tmp_path / "k"))
    assert m.rows == [
        {"path": a, "dataset": "kinetics", "youtube_id": "--GkrdYZ9Tc", "label": "abseiling", "split": "train",
         "is_cc": 0, "youtube_start_s": 0.0, "youtube_end_s": 10.0},
        {"path": b, "dataset": "kinetics", "youtube_id": "--nQbRBEz2s", "label": "air drumming", "split": "train",
         "is_cc": 1, "youtube_start_s": 104.0, "youtube_end_s": 114.0},
        {"path": str((tmp_path / "k" / "zumba" / "missingvid0_000005_000015.mp4").resolve()), "dataset": "kinetics",
         "youtube_id": "missingvid0", "label": "zumba", "split": "train", "is_cc": 0,
         "youtube_start_s": 5.0, "youtube_end_s": 15.0}]
    assert m.missing == [m.rows[2]["path"]] and m.skipped == [(f"{meta}:5", "end 10 is not after start 20")]
    test = tmp_path / "test.csv"
    test.write_text("youtube_id,time_start,time_end,split\n--33Lscn6sk,4,14,test\n")
    t = build("kinetics", str(test), str(tmp_path / "k"))
    assert t.rows[0]["label"] is None and t.rows[0]["path"].endswith("/k/test/--33Lscn6sk_000004_000014.mp4")
    bad = tmp_path / "bad.csv"
    bad.write_text("youtube_id,start,end\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: Kinetics header must name"):
        build("kinetics", str(bad), str(tmp_path))


def test_audioset_comment_header_quoted_mids_and_label_index(tmp_path):
    meta = tmp_path / "balanced_train_segments.csv"
    meta.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                    "# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4\n"
                    "# YTID, start_seconds, end_seconds, positive_labels\n"
                    '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
                    '--ZhevVpy1s, 50.000, 60.000, "/m/012xff"\n'
                    '--aE2O5G5WE, 0.000, 10.000, "/m/zzzzz"\n')
    labels = tmp_path / "class_labels_indices.csv"
    labels.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/t/dd00088,"Gush"\n'
                      '2,/m/012xff,"Child speech, kid speaking"\n')
    assert read_audioset_labels(str(labels)) == {"/m/09x0r": "Speech", "/t/dd00088": "Gush",
                                                 "/m/012xff": "Child speech, kid speaking"}
    m = build("audioset", str(meta), str(tmp_path), labels=str(labels))
    assert [r["mids"] for r in m.rows] == [["/m/09x0r", "/t/dd00088"], ["/m/012xff"]]
    assert [r["labels"] for r in m.rows] == [["Speech", "Gush"], ["Child speech, kid speaking"]]
    assert m.rows[0] == {"path": str((tmp_path / "--PJHxphWEs.mp4").resolve()), "dataset": "audioset",
                         "youtube_id": "--PJHxphWEs", "mids": ["/m/09x0r", "/t/dd00088"], "labels": ["Speech", "Gush"],
                         "segment_start_s": 30.0, "segment_end_s": 40.0}
    assert m.missing == [m.rows[0]["path"], m.rows[1]["path"]]
    assert m.skipped == [(f"{meta}:6", f"label mid(s) ['/m/zzzzz'] are not in {labels}")]
    assert len(build("audioset", str(meta), str(tmp_path)).rows) == 3  # without the index: mids only
    with pytest.raises(ValueError, match="--labels is AudioSet's class_labels_indices.csv"):
        build("vggsound", str(meta), str(tmp_path), labels=str(labels))


def _msrvtt(tmp_path: Path) -> Path:
    meta = tmp_path / "train_val_videodatainfo.json"
    meta.write_text(json.dumps({
        "info": {"year": "2016"},
        "videos": [{"id": 0, "video_id": "video0", "category": 9, "url": "https://www.youtube.com/watch?v=9lZi22qLlEo",
                    "start time": 137.72, "end time": 149.44, "split": "train"},
                   {"id": 1, "video_id": "video1", "category": 16, "url": "https://www.youtube.com/watch?v=w4JM08PDEng",
                    "start time": 184.33, "end time": 206.89, "split": "validate"},
                   {"id": 2, "video_id": "video2", "split": "train"}],
        "sentences": [{"sen_id": 7, "video_id": "video0", "caption": "a car is shown"},
                      {"sen_id": 3, "video_id": "video0", "caption": "a man drives a vehicle"},
                      {"sen_id": 4, "video_id": "video1", "caption": "someone cooks food"}]}))
    return meta


def test_msrvtt_captions_by_sentence_id(tmp_path):
    meta = _msrvtt(tmp_path)
    v0 = _touch(tmp_path / "TrainValVideo" / "video0.mp4")
    m = build("msrvtt", str(meta), str(tmp_path / "TrainValVideo"))
    assert m.rows[0] == {"path": v0, "dataset": "msrvtt", "msrvtt_id": "video0", "category": 9, "split": "train",
                         "url": "https://www.youtube.com/watch?v=9lZi22qLlEo", "caption": "a man drives a vehicle",
                         "captions": ["a man drives a vehicle", "a car is shown"],
                         "youtube_start_s": 137.72, "youtube_end_s": 149.44}
    assert m.rows[1]["captions"] == ["someone cooks food"] and len(m.rows) == 2
    assert m.missing == [str((tmp_path / "TrainValVideo" / "video1.mp4").resolve())]
    assert m.skipped == [(f"{meta}: videos[2]",
                          "needs video_id, category, url, start time, end time, split: KeyError('start time')")]


def test_music_avqa_questions_per_video(tmp_path):
    """MUSIC-AVQA's released JSON (placeholders filled from templ_values, the `anser` key, types as
    Python literals) -> one row per video with its questions by question_id as a `qa` column that
    the vqa task reads (pipelines.questions.parse_qa)."""
    from pipelines.questions import parse_qa

    meta = tmp_path / "avqa-test.json"
    meta.write_text(json.dumps([
        {"video_id": "00000272", "question_id": 24, "type": "['Audio-Visual', 'Existential']",
         "question_content": "Is the <Object> in the video always playing?", "templ_values": "['cello']",
         "question_deleted": 0, "anser": "yes"},
        {"video_id": "00000272", "question_id": 3, "type": "['Audio', 'Counting']",
         "question_content": "How many musical instruments were heard throughout the video?", "templ_values": "[]",
         "question_deleted": 0, "anser": "two"},
        {"video_id": "00000099", "question_id": 7, "type": "['Audio-Visual', 'Comparative']",
         "question_content": "Is the <Object> louder than the <Object>?", "templ_values": "['piano', 'acoustic_guitar']",
         "question_deleted": 0, "answer": "no"},
        {"video_id": "00000099", "question_id": 8, "type": "['Visual', 'Location']", "question_content": "x",
         "templ_values": "[]", "question_deleted": 1, "anser": "left"},
        {"video_id": "00000100", "question_id": 9, "type": "['Visual', 'Counting']",
         "question_content": "Are there <Object> and <Object>?", "templ_values": "['drum']", "anser": "no"}]))
    v272 = _touch(tmp_path / "videos" / "00000272.mp4")
    m = build("music-avqa", str(meta), str(tmp_path / "videos"))
    assert [(r["path"], r["dataset"], r["music_avqa_id"]) for r in m.rows] == [
        (v272, "music-avqa", "00000272"), (str((tmp_path / "videos" / "00000099.mp4").resolve()), "music-avqa", "00000099")]
    assert parse_qa(m.rows[0]["qa"]) == [
        {"question": "How many musical instruments were heard throughout the video?", "answer": "two",
         "type": "Audio/Counting"},
        {"question": "Is the cello in the video always playing?", "answer": "yes", "type": "Audio-Visual/Existential"}]
    assert parse_qa(m.rows[1]["qa"]) == [{"question": "Is the piano louder than the acoustic_guitar?", "answer": "no",
                                          "type": "Audio-Visual/Comparative"}]  # the deleted question is left out
    assert m.missing == [str((tmp_path / "videos" / "00000099.mp4").resolve())]
    assert m.skipped == [(f"{meta}: [4]", "needs video_id, question_content, templ_values, anser, type: "
                                          "ValueError('2 placeholder(s) but 1 templ_values')")]


def _vggss(tmp_path: Path) -> Path:
    meta = tmp_path / "vggss.json"
    meta.write_text(json.dumps([
        {"file": "zpWuikVorYg_000032", "class": "elk bugling", "bbox": [[0.25, 0.5, 0.75, 1.0]]},
        {"file": "ORaz32CQ29k_000130", "class": "coyote howling", "bbox": [[0.1, 0.2, 0.6, 0.9], [0.7, 0.3, 1.2, 0.5]]},
        {"file": "noboxes_000000", "class": "x", "bbox": [[0.5, 0.5, 0.1, 0.9]]}]))
    return meta


def test_vggss_and_flickr_boxes(tmp_path):
    meta = _vggss(tmp_path)
    m = build("vggss", str(meta), str(tmp_path))
    assert [(r["vggss_file"], r["label"]) for r in m.rows] == [("zpWuikVorYg_000032", "elk bugling"),
                                                               ("ORaz32CQ29k_000130", "coyote howling")]
    assert json.loads(m.rows[1]["gt_boxes"]) == {"boxes": [[0.1, 0.2, 0.6, 0.9], [0.7, 0.3, 1.0, 0.5]],
                                                 "votes": 1, "time_s": 4.96}
    assert m.rows[0]["path"] == str((tmp_path / "zpWuikVorYg_000032.mp4").resolve())
    assert (m.rows[0]["youtube_start_s"], m.rows[0]["youtube_end_s"]) == (32.0, 42.0)
    assert m.skipped == [(f"{meta}: [2]", "needs file <ytid>_<start>, class, bbox [[x0, y0, x1, y1], ...]: "
                                          f"box [0.5, 0.5, 0.1, 0.9] is not x0 <= x1, y0 <= y1 ({meta}: [2])")]

    ann = tmp_path / "Annotations"
    ann.mkdir()
    # two annotators' boxes in 256 x 256 pixels, read as LVS does (first child of <bbox> skipped)
    (ann / "10000130166.xml").write_text(
        "<annotation><file>10000130166.jpg</file>"
        "<object><bbox><label>1</label><xmin>0</xmin><ymin>64</ymin><xmax>128</xmax><ymax>256</ymax></bbox></object>"
        "<object><bbox><label>2</label><xmin>64</xmin><ymin>0</ymin><xmax>256</xmax><ymax>128</ymax></bbox></object>"
        "</annotation>")
    (ann / "2.xml").write_text("<annotation><size><width>640</width><height>480</height></size><object><name>dog</name>"
                               "<bndbox><xmin>64</xmin><ymin>48</ymin><xmax>320</xmax><ymax>480</ymax></bndbox>"
                               "</object></annotation>")
    (ann / "3.xml").write_text("<annotation><object></object></annotation>")
    assert flickr_boxes(str(ann / "10000130166.xml")) == ([[0.0, 0.25, 0.5, 1.0], [0.25, 0.0, 1.0, 0.5]], (256, 256))
    assert flickr_boxes(str(ann / "2.xml")) == ([[0.1, 0.1, 0.5, 1.0]], (640, 480))
    f = build("flickr_soundnet", str(ann), str(tmp_path))
    assert [r["flickr_id"] for r in f.rows] == ["10000130166", "2"] and f.missing == [r["path"] for r in f.rows]
    assert json.loads(f.rows[0]["gt_boxes"]) == {"boxes": [[0.0, 0.25, 0.5, 1.0], [0.25, 0.0, 1.0, 0.5]],
                                                 "votes": 2, "time_s": None}
    assert f.skipped == [(str(ann / "3.xml"), "no <bbox> or <object><bndbox>")]


def test_box_mask_consensus_and_exact_ciou():
    from jobs.tasks.localization import box_mask
    from models.metrics import ciou
    from pipelines.decode import DecodeConfig

    cfg = DecodeConfig(fps=4.0, size=32)
    one = json.dumps({"boxes": [[0.25, 0.5, 0.75, 1.0]], "votes": 1, "time_s": 4.96})
    assert box_mask(one, 0.0, 1.0, 64, 64, cfg) is None  # the clip [0, 1) does not show 4.96 s
    m = box_mask(one, 4.0, 1.0, 64, 64, cfg)  # 64 x 64 source -> 32 x 32: box at rows 16:32, cols 8:24
    assert m.dtype == np.float32 and m.sum() == 256 and m[16:32, 8:24].all()
    heat = torch.zeros(1, 32, 32)
    heat[0, 16:32, 8:16] = 1.0  # half the box
    assert ciou(heat, torch.from_numpy(m)[None], 0.5, binarize="value").item() == 0.5
    heat[0, 0:4, 0:16] = 1.0  # plus 64 pixels outside it
    assert ciou(heat, torch.from_numpy(m)[None], 0.5, binarize="value").item() == 128 / (256 + 64)
    # Flickr-SoundNet consensus: one annotator's box counts 0.5, both 1 (LVS: gt_map / 2, capped at 1)
    two = {"boxes": [[0.0, 0.25, 0.5, 1.0], [0.25, 0.0, 1.0, 0.5]], "votes": 2, "time_s": None}
    c = box_mask(two, 0.0, 1.0, 64, 64, cfg)
    assert sorted(np.unique(c).tolist()) == [0.0, 0.5, 1.0]
    assert (c == 1.0).sum() == 8 * 8 and c.sum() == 0.5 * (16 * 24 + 24 * 16)


def test_boxes_land_where_the_clips_resize_put_the_source(tmp_path):
    """A 64 x 32 source and the box of its left half on 32 px frames: the centre crop keeps
    columns 16..48 of the source at full height (the box covers frame columns 0:16, all rows);
    the letterbox shrinks it to 32 x 16 at rows 8:24 (the box: columns 0:16 of those rows).
    Localization's targets follow each clip's `resize` column."""
    from jobs.tasks import get
    from models.localization import PRESETS
    from pipelines.clipsettings import ClipSettings
    from pipelines.upload import decode_upload

    src = tmp_path / "wide.mp4"
    write_video(src, seconds=1.0, width=64, height=32, fps=10.0)
    box = json.dumps({"boxes": [[0.0, 0.0, 0.5, 1.0]], "votes": 1, "time_s": None})
    task, masks = get("localization"), {}
    for resize in ("crop", "letterbox"):
        rows, _ = decode_upload(src.read_bytes(), ClipSettings(clip_seconds=1.0, fps=4.0, size=32, resize=resize),
                                max_pixels=10**6, max_seconds=10.0)
        assert rows["resize"].tolist() == [resize]
        rows = {**rows, "gt_boxes": np.array([box], object), "ground_truth": np.array([None], object)}
        masks[resize] = task.prepare(rows, PRESETS["tiny"])["box_mask"][0]
    crop, letterbox = np.zeros((32, 32), np.float32), np.zeros((32, 32), np.float32)
    crop[:, 0:16] = 1.0
    letterbox[8:24, 0:16] = 1.0
    assert np.array_equal(masks["crop"], crop) and np.array_equal(masks["letterbox"], letterbox)


def test_manifest_cli_writes_jsonl_and_refuses_bad_rows_with_strict(tmp_path, capsys):
    meta = tmp_path / "vggsound.csv"
    meta.write_text("--PJHxphWEs,30,people marching,train\nbad\n")
    out = tmp_path / "m.jsonl"
    assert main(["manifest", "vggsound", str(meta), "--root", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"1 row(s) -> {out}; 1 file(s) missing under {tmp_path}; 1 metadata row(s) skipped" in printed
    assert f"  missing {(tmp_path / '--PJHxphWEs_000030.mp4').resolve()}\n" in printed
    assert f"  skipped {meta}:2: expected 4 fields" in printed
    assert [json.loads(x)["youtube_id"] for x in out.read_text().splitlines()] == ["--PJHxphWEs"]
    assert list(json.loads(out.read_text().splitlines()[0]))[0] == "path"
    assert main(["manifest", "vggsound", str(meta), "--root", str(tmp_path), "--out", str(out), "--strict"]) == 2
    assert capsys.readouterr().err == f"avray manifest: error: {meta}:2: expected 4 fields youtube_id,start_seconds,label,split, got 1\n"


def test_manifests_through_preprocess_and_localization_targets(ray_local, tmp_path, capsys):
    from jobs.data import numpy_batches
    from jobs.preprocess import PreprocessConfig, run
    from jobs.tasks import get
    from models.localization import PRESETS, SoundLocalizer, heatmap
    from models.metrics import auc_success, ciou, ciou_at

    vs = tmp_path / "vggsound"
    a = _video(vs / "--PJHxphWEs_000030.mp4")
    meta = tmp_path / "vggsound.csv"
    meta.write_text("--PJHxphWEs,30,people marching,train\n0Bkn8eZhZGQ,4,dog barking,test\n")
    _msrvtt(tmp_path)
    v0 = _video(tmp_path / "TrainValVideo" / "video0.mp4")
    v1 = _video(tmp_path / "TrainValVideo" / "video1.mp4", seconds=3.0)
    ss = tmp_path / "vggss"
    s0 = _video(ss / "zpWuikVorYg_000032.mp4", seconds=6.0)
    _vggss(tmp_path)
    for ds, md, root in [("vggsound", meta, vs), ("msrvtt", tmp_path / "train_val_videodatainfo.json", tmp_path / "TrainValVideo"),
                         ("vggss", tmp_path / "vggss.json", ss)]:
        assert main(["manifest", ds, str(md), "--root", str(root), "--out", str(tmp_path / f"{ds}.jsonl")]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert run(PreprocessConfig(inputs=tuple(str(tmp_path / f"{d}.jsonl") for d in ("vggsound", "msrvtt", "vggss")),
                                out=str(out), clip_seconds=1.0, fps=4.0, size=32)) == 0
    clips = pq.read_table(out / "clips").sort_by([("source_path", "ascending"), ("clip_index", "ascending")])
    got = {}
    for r in clips.select(["source_path", "dataset", "label", "caption", "youtube_start_s"]).to_pylist():
        got.setdefault(r["source_path"], []).append((r["dataset"], r["label"], r["caption"], r["youtube_start_s"]))
    assert got == {a: [("vggsound", "people marching", None, 30.0)] * 2,
                   v0: [("msrvtt", None, "a man drives a vehicle", 137.72)] * 2,
                   v1: [("msrvtt", None, "someone cooks food", 184.33)] * 3,
                   s0: [("vggss", "elk bugling", None, 32.0)] * 6}
    assert clips.filter(pc.equal(clips.column("source_path"), v0)).column("captions").to_pylist()[0] == [
        "a man drives a vehicle", "a car is shown"]
    # listed files that are not on disk (vggsound 0Bkn8eZhZGQ, msrvtt video2 was skipped, vggss ORaz32CQ29k) are error rows
    errors = pq.read_table(out / "errors")
    assert sorted(Path(p).name for p in errors.column("path").to_pylist()) == ["0Bkn8eZhZGQ_000004.mp4",
                                                                                "ORaz32CQ29k_000130.mp4"]

    # VGG-SS boxes reach the localization targets: only the clip showing 4.96 s has a box
    task = get("localization")
    b = next(numpy_batches(str(out / "clips"), list(task.columns), 64,
                           pc.field("dataset") == "vggss"))
    cfg = PRESETS["tiny"]
    x = task.prepare(b, cfg)
    order = np.argsort(b["start_s"])
    assert x["has_box"][order].tolist() == [False, False, False, False, True, False]
    mask = x["box_mask"][order[4]]
    assert mask.dtype == np.float32 and mask.sum() == 256 and mask[16:32, 8:24].all()
    assert pa.types.is_string(clips.schema.field("gt_boxes").type)
    # the task's own training step and evaluation take the float map: one clip scored
    torch.manual_seed(0)
    model = SoundLocalizer(cfg).eval()
    batch = task.collate(b, cfg)
    assert torch.isfinite(task.step(model, batch, cfg)["loss"])
    metrics = task.evaluate(model, [batch], cfg)
    keep = batch["has_box"]
    with torch.no_grad():
        c = ciou(heatmap(model(batch["frame"][keep], batch["logmel"][keep]), (32, 32)), batch["box_mask"][keep],
                 0.5, binarize="value")
    assert metrics["clips_with_box"] == 1.0
    assert metrics["ciou50_own_audio"] == ciou_at(c, 0.5) and metrics["auc_own_audio"] == auc_success(c)
