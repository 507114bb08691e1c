"""Dataset adapters: a standard dataset's own metadata + its usual file naming -> avray manifest rows.

Each adapter is a plain function `(metadata, root, options) -> DatasetManifest`, listed in
`ADAPTERS`; `avray manifest` (jobs/manifest.py) writes the rows as JSONL. A row's `path` comes
first (absolute, under `root`); every other column is carried into each clip row by `avray
preprocess` (pipelines/sources.py). Every row has `dataset` (the adapter's name).

Time spans. A dataset row names a span of a YouTube video. When the files on disk are the
*trimmed* clips (the usual downloads: VGGSound, AVSpeech, Kinetics, MSR-VTT, VGG-SS), the span is kept as
`youtube_start_s` / `youtube_end_s` (information only: the file is the span). When the files are
the *untrimmed* videos (`--no-trimmed`; the default for AudioSet), the span becomes
`segment_start_s` / `segment_end_s`, which preprocess ingests alone (clip times stay file times).
`start_s` / `end_s` are clip columns and never written here.

File naming. `pattern` is a `str.format` template relative to `root` with the fields `ytid`,
`start`, `end` (int when whole seconds, else float), `start_text`, `end_text` (the times as the
metadata writes them; AVSpeech, AudioSet), `label`, `split`, `id` (the dataset's own file /
video id). Each adapter has default patterns (`ADAPTERS`); with several, the first that exists
on disk wins per row, else the first.

Box ground truth (VGG-SS, Flickr-SoundNet): a `gt_boxes` column, a JSON string
`{"boxes": [[x0, y0, x1, y1], ...], "votes": v, "time_s": t}` with boxes normalised to [0, 1] of
the displayed source frame, `votes`: how many boxes must cover a pixel for it to count fully
(consensus map min(1, count / votes), as LVS scores Flickr-SoundNet with 2 annotators' boxes), and
`time_s`: the file time of the annotated frame (null: every frame). jobs/tasks/localization.py
turns it into the same `box_mask` that the synthetic `ground_truth` gives.

Bad metadata. A metadata row that cannot be parsed is skipped, logged as a warning with its
file and line number and returned in `skipped` (`avray manifest --strict` refuses the file
instead). Rows whose file is absent under `root` are kept (preprocess records them as errors)
and listed in `missing`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import string
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)

# VGG-SS boxes annotate the 125th frame (1-based) of the 25 fps 10 s clip (ACL-SSL VGGSS/README.md).
VGGSS_BOX_TIME_S = 124 / 25
# LVS / EZ-VSL read Flickr-SoundNet boxes as pixels of a 256 x 256 image (`224 * v / 256`).
FLICKR_IMAGE_SIZE = 256


@dataclass
class DatasetManifest:
    """Manifest rows (dicts, `path` first), the metadata rows skipped as (file:line, reason) and
    the paths of the rows whose file is absent under the root (those rows are kept)."""
    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


class _Builder:
    """Collects rows, resolving each against the patterns and counting absent files."""

    def __init__(self, name: str, root: str | os.PathLike, patterns: Sequence[str], strict: bool):
        self.name, self.root, self.patterns, self.strict = name, Path(root).resolve(), list(patterns), strict
        self.out = DatasetManifest(rows=[])

    def path(self, **fields: Any) -> str:
        candidates = []
        for p in self.patterns:
            try:
                candidates.append(self.root / p.format(**fields))
            except (KeyError, ValueError, IndexError) as e:
                raise ValueError(f"file pattern {p!r} does not fit this row: {type(e).__name__}: {e}") from None
        for c in candidates:
            if c.exists():
                return str(c)
        self.out.missing.append(str(candidates[0]))
        return str(candidates[0])

    def add(self, names: dict[str, Any], **columns: Any) -> None:
        """A row whose file is named by the pattern fields `names`; the columns are evaluated
        (and validated) by the caller first, so a refused row is never counted as missing."""
        self.out.rows.append({"path": self.path(**names), "dataset": self.name, **columns})

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise ValueError(f"{where}: {reason}")
        log.warning("%s: skipped: %s", where, reason)
        self.out.skipped.append((where, reason))


def _seconds(text: str, what: str) -> int | float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{what} must be a number >= 0, got {text!r}")
    return int(v) if v.is_integer() else v


def _csv_rows(path: Path, comment: bool = False) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-empty CSV record; `comment`: skip `#` lines.
    Fields are stripped of the spaces that follow commas (AudioSet writes `a, b, "c,d"`)."""
    with open(path, newline="", encoding="utf-8-sig") as f:  # streamed: AudioSet's unbalanced CSV has 2M rows
        reader = csv.reader(f, skipinitialspace=True)
        while True:
            line = reader.line_num + 1
            try:
                rec = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise ValueError(f"{path}:{line}: not CSV: {e}") from None
            if not rec or all(not x.strip() for x in rec):
                continue
            if comment and rec[0].lstrip().startswith("#"):
                continue
            yield line, [x.strip() for x in rec]


def _span(trimmed: bool, start: int | float, end: int | float) -> dict[str, Any]:
    if end <= start:
        raise ValueError(f"end {end} is not after start {start}")
    key = "youtube" if trimmed else "segment"
    return {f"{key}_start_s": float(start), f"{key}_end_s": float(end)}


# -- the adapters -----------------------------------------------------------------------------


def vggsound(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
             strict: bool = False) -> DatasetManifest:
    """VGGSound `vggsound.csv`: no header, `youtube_id,start_seconds,label,split`, 10 s spans.
    -> youtube_id, label, split and the span [start, start + 10)."""
    b = _Builder("vggsound", root, patterns, strict)
    for line, rec in _csv_rows(Path(metadata)):
        where = f"{metadata}:{line}"
        try:
            if len(rec) != 4:
                raise ValueError(f"expected 4 fields youtube_id,start_seconds,label,split, got {len(rec)}")
            ytid, start_text, label, split = rec
            start = _seconds(start_text, "start_seconds")
            b.add(dict(ytid=ytid, start=start, end=start + 10, label=label, split=split, id=ytid),
                  youtube_id=ytid, label=label, split=split, **_span(trimmed, start, start + 10))
        except ValueError as e:
            b.skip(where, str(e))
    return b.out


def avspeech(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
             strict: bool = False) -> DatasetManifest:
    """AVSpeech CSV: no header, `youtube_id,start,end,face_x,face_y` (face centre normalised to
    [0, 1] of the frame, x from the left, y from the top). -> youtube_id, face_x, face_y, span."""
    b = _Builder("avspeech", root, patterns, strict)
    for line, rec in _csv_rows(Path(metadata)):
        where = f"{metadata}:{line}"
        try:
            if len(rec) != 5:
                raise ValueError(f"expected 5 fields youtube_id,start,end,face_x,face_y, got {len(rec)}")
            ytid = rec[0]
            start, end = _seconds(rec[1], "start"), _seconds(rec[2], "end")
            fx, fy = float(rec[3]), float(rec[4])
            if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
                raise ValueError(f"face centre ({fx}, {fy}) is not in [0, 1]")
            b.add(dict(ytid=ytid, start=start, end=end, start_text=rec[1], end_text=rec[2], label="", split="",
                       id=ytid),
                  youtube_id=ytid, face_x=fx, face_y=fy, **_span(trimmed, start, end))
        except ValueError as e:
            b.skip(where, str(e))
    return b.out


def kinetics(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
             strict: bool = False) -> DatasetManifest:
    """Kinetics-400/600/700 CSV with a header `label,youtube_id,time_start,time_end,split[,is_cc]`
    (the test split has no `label`). -> youtube_id, label (null when absent), split, is_cc, span."""
    b = _Builder("kinetics", root, patterns, strict)
    rows = _csv_rows(Path(metadata))
    first = next(rows, None)
    if first is None:
        return b.out
    header = first[1]
    need = {"youtube_id", "time_start", "time_end", "split"}
    if not need <= set(header):
        raise ValueError(f"{metadata}:{first[0]}: Kinetics header must name {sorted(need)} (and label), got {header}")
    col = {h: i for i, h in enumerate(header)}
    for line, rec in rows:
        where = f"{metadata}:{line}"
        try:
            if len(rec) != len(header):
                raise ValueError(f"expected {len(header)} fields ({','.join(header)}), got {len(rec)}")
            ytid, split = rec[col["youtube_id"]], rec[col["split"]]
            label = rec[col["label"]] if "label" in col else None
            start, end = _seconds(rec[col["time_start"]], "time_start"), _seconds(rec[col["time_end"]], "time_end")
            extra: dict[str, Any] = {}
            if "is_cc" in col:
                extra["is_cc"] = int(rec[col["is_cc"]])
            fields = dict(ytid=ytid, start=start, end=end, label=label if label is not None else split,
                          split=split, id=ytid)
            b.add(fields, youtube_id=ytid, label=label, split=split, **extra,
                  **_span(trimmed, start, end))
        except ValueError as e:
            b.skip(where, str(e))
    return b.out


def read_audioset_labels(path: str) -> dict[str, str]:
    """AudioSet `class_labels_indices.csv` (header `index,mid,display_name`) -> {mid: display_name}."""
    rows = _csv_rows(Path(path))
    first = next(rows, None)
    if first is None or first[1][:3] != ["index", "mid", "display_name"]:
        got = first[1] if first else "nothing"
        raise ValueError(f"{path}:1: expected the header index,mid,display_name, got {got}")
    names: dict[str, str] = {}
    for line, rec in rows:
        if len(rec) != 3:
            raise ValueError(f"{path}:{line}: expected 3 fields index,mid,display_name, got {len(rec)}")
        names[rec[1]] = rec[2]
    return names


def audioset(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = False,
             strict: bool = False, labels: str | None = None) -> DatasetManifest:
    """AudioSet segment CSV (`balanced_train_segments.csv`, ...): `#` header lines, then
    `YTID, start_seconds, end_seconds, positive_labels` with the labels a quoted comma-separated
    list of mids. -> youtube_id, mids (list) and, with `labels` (class_labels_indices.csv), their
    display names `labels` (list, same order); span."""
    names = read_audioset_labels(labels) if labels else None
    b = _Builder("audioset", root, patterns, strict)
    for line, rec in _csv_rows(Path(metadata), comment=True):
        where = f"{metadata}:{line}"
        try:
            if len(rec) != 4:
                raise ValueError(f"expected 4 fields YTID, start_seconds, end_seconds, positive_labels, got {len(rec)}")
            ytid = rec[0]
            start, end = _seconds(rec[1], "start_seconds"), _seconds(rec[2], "end_seconds")
            mids = [m.strip() for m in rec[3].split(",") if m.strip()]
            extra: dict[str, Any] = {"mids": mids}
            if names is not None:
                unknown = [m for m in mids if m not in names]
                if unknown:
                    raise ValueError(f"label mid(s) {unknown} are not in {labels}")
                extra["labels"] = [names[m] for m in mids]
            b.add(dict(ytid=ytid, start=start, end=end, start_text=rec[1], end_text=rec[2], label="", split="",
                       id=ytid),
                  youtube_id=ytid, **extra, **_span(trimmed, start, end))
        except ValueError as e:
            b.skip(where, str(e))
    return b.out


def _read_json(metadata: str) -> Any:
    """A metadata file's JSON; ValueError naming the file and line when it is not JSON."""
    try:
        return json.loads(Path(metadata).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{metadata}:{e.lineno}: not JSON: {e.msg}") from None


def msrvtt(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
           strict: bool = False) -> DatasetManifest:
    """MSR-VTT JSON (`train_val_videodatainfo.json` / `test_videodatainfo.json`): `videos` [{id,
    video_id, category, url, start time, end time, split}], `sentences` [{sen_id, video_id,
    caption}]. -> msrvtt_id, category, split, url, caption (the lowest sen_id's), captions (all, by
    sen_id), span. Positions in the error messages are `videos[i]` / `sentences[i]` (JSON has no lines)."""
    data = _read_json(metadata)
    if not (isinstance(data, dict) and isinstance(data.get("videos"), list)
            and isinstance(data.get("sentences"), list)):
        raise ValueError(f"{metadata}: expected an object with 'videos' and 'sentences' arrays")
    b = _Builder("msrvtt", root, patterns, strict)
    captions: dict[str, list[tuple[int, str]]] = {}
    for i, s in enumerate(data["sentences"]):
        try:
            captions.setdefault(str(s["video_id"]), []).append((int(s["sen_id"]), str(s["caption"])))
        except (KeyError, TypeError, ValueError) as e:
            b.skip(f"{metadata}: sentences[{i}]", f"needs sen_id, video_id, caption: {e!r}")
    for i, v in enumerate(data["videos"]):
        try:
            vid = str(v["video_id"])
            start, end = _seconds(str(v["start time"]), "start time"), _seconds(str(v["end time"]), "end time")
            caps = [c for _, c in sorted(captions.get(vid, []))]
            b.add(dict(ytid=vid, start=start, end=end, label=str(v.get("category", "")), split=str(v["split"]), id=vid),
                  msrvtt_id=vid, category=int(v["category"]), split=str(v["split"]), url=str(v["url"]),
                  caption=caps[0] if caps else None, captions=caps, **_span(trimmed, start, end))
        except (KeyError, TypeError, ValueError) as e:
            b.skip(f"{metadata}: videos[{i}]", f"needs video_id, category, url, start time, end time, split: {e!r}")
    return b.out


def _box(values: Sequence[float], where: str) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in values)
    if not (x0 <= x1 and y0 <= y1):
        raise ValueError(f"box {[x0, y0, x1, y1]} is not x0 <= x1, y0 <= y1 ({where})")
    return [min(max(v, 0.0), 1.0) for v in (x0, y0, x1, y1)]


def vggss(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
          strict: bool = False) -> DatasetManifest:
    """VGG-SS `vggss.json`: a list of {file: `<ytid>_<start:06d>`, class, bbox: [[x0, y0, x1, y1],
    ...] normalised}. -> vggss_file, label (its class), gt_boxes (votes 1: any box counts; the
    annotated frame at VGGSS_BOX_TIME_S of the 10 s clip, or of the segment when untrimmed)."""
    data = _read_json(metadata)
    if not isinstance(data, list):
        raise ValueError(f"{metadata}: expected a JSON list of {{file, class, bbox}}")
    b = _Builder("vggss", root, patterns, strict)
    for i, a in enumerate(data):
        where = f"{metadata}: [{i}]"
        try:
            name = str(a["file"])
            ytid, _, start_text = name.rpartition("_")
            start = _seconds(start_text, f"start in file name {name!r}")
            boxes = [_box(bb, where) for bb in a["bbox"]]
            if not boxes:
                raise ValueError("no bbox")
            t = VGGSS_BOX_TIME_S if trimmed else start + VGGSS_BOX_TIME_S
            gt = json.dumps({"boxes": boxes, "votes": 1, "time_s": t})
            b.add(dict(ytid=ytid, start=start, end=start + 10, label=str(a["class"]), split="test", id=name),
                  vggss_file=name, label=str(a["class"]), gt_boxes=gt, **_span(trimmed, start, start + 10))
        except (KeyError, TypeError, ValueError) as e:
            b.skip(where, f"needs file <ytid>_<start>, class, bbox [[x0, y0, x1, y1], ...]: {e}")
    return b.out


def flickr_boxes(xml_path: str) -> tuple[list[list[float]], tuple[int, int]]:
    """Boxes of one Flickr-SoundNet annotation XML, normalised, and the image size they were
    normalised by. A box is a `<bbox>` (children xmin, ymin, xmax, ymax; unnamed children: the
    last four, as LVS reads them after skipping the first) or a PASCAL-VOC `<object><bndbox>`.
    The size is `<size><width><height>` when given, else 256 x 256 (LVS's reading)."""
    root = ET.parse(xml_path).getroot()
    size = root.find("size")
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        w, h = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    else:
        w = h = FLICKR_IMAGE_SIZE
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {w} x {h} is not positive")
    boxes = []
    for el in [*root.iter("bbox"), *root.iter("bndbox")]:
        named = [el.findtext(k) for k in ("xmin", "ymin", "xmax", "ymax")]
        vals = named if None not in named else [c.text for c in el][-4:]
        if len(vals) != 4:
            raise ValueError(f"<{el.tag}> has {len(vals)} coordinates, expected xmin, ymin, xmax, ymax")
        x0, y0, x1, y1 = (float(v) for v in vals)
        boxes.append(_box([x0 / w, y0 / h, x1 / w, y1 / h], f"<{el.tag}>"))
    if not boxes:
        raise ValueError("no <bbox> or <object><bndbox>")
    return boxes, (w, h)


def flickr_soundnet(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
                    strict: bool = False) -> DatasetManifest:
    """Flickr-SoundNet test annotations: METADATA is the folder of `<id>.xml` files (one per
    image, several annotators' boxes). -> flickr_id, gt_boxes (votes 2: LVS's consensus map,
    min(1, count / 2); time_s null: the annotated frame's time is not in the annotation)."""
    folder = Path(metadata)
    if not folder.is_dir():
        raise ValueError(f"{metadata}: Flickr-SoundNet metadata is the folder of per-image .xml annotations")
    b = _Builder("flickr_soundnet", root, patterns, strict)
    for xml in sorted(folder.glob("*.xml")):
        try:
            boxes, _ = flickr_boxes(str(xml))
        except (ET.ParseError, ValueError, TypeError) as e:
            b.skip(str(xml), str(e))
            continue
        fid = xml.stem
        b.add(dict(ytid=fid, start=0, end=0, label="", split="test", id=fid), flickr_id=fid,
              gt_boxes=json.dumps({"boxes": boxes, "votes": 2, "time_s": None}))
    return b.out



def _template_values(text: Any, where: str) -> list[str]:
    """MUSIC-AVQA's `templ_values`: a Python-literal list as a string (e.g. "['cello', 'piano']"), or a list."""
    import ast

    values = ast.literal_eval(text) if isinstance(text, str) else text
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"templ_values is not a list ({where})")
    return [str(v) for v in values]


def music_avqa(metadata: str, root: str, patterns: Sequence[str], trimmed: bool = True,
               strict: bool = False) -> DatasetManifest:
    """MUSIC-AVQA (Li et al. CVPR 2022) `avqa-train.json` / `avqa-val.json` / `avqa-test.json`: a
    list of {video_id, question_id, type: "['Audio-Visual', 'Counting']" (a Python literal),
    question_content with `<Object>`-style placeholders, templ_values: "['cello']" (filling the
    placeholders in order), anser (sic: the released key; `answer` is accepted too)}. -> one row
    per video: music_avqa_id, qa: a JSON list of {question, answer, type ("Audio-Visual/Counting")}
    by question_id. Questions with `question_deleted` set are left out."""
    import re

    data = _read_json(metadata)
    if not isinstance(data, list):
        raise ValueError(f"{metadata}: expected a JSON list of {{video_id, question_content, templ_values, anser, type}}")
    b = _Builder("music-avqa", root, patterns, strict)
    videos: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for i, a in enumerate(data):
        where = f"{metadata}: [{i}]"
        try:
            if int(a.get("question_deleted", 0) or 0):
                continue
            values = _template_values(a.get("templ_values", "[]"), where)
            slots = re.findall(r"<[^<>]+>", a["question_content"])
            if len(slots) != len(values):
                raise ValueError(f"{len(slots)} placeholder(s) but {len(values)} templ_values")
            question = a["question_content"]
            for slot, v in zip(slots, values):
                question = question.replace(slot, v, 1)
            answer = a["anser"] if "anser" in a else a["answer"]
            kinds = _template_values(a.get("type", "[]"), where)
            qa = {"question": question, "answer": str(answer), "type": "/".join(kinds) or "user"}
            videos.setdefault(str(a["video_id"]), []).append((int(a.get("question_id", i)), qa))
        except (KeyError, TypeError, ValueError, SyntaxError) as e:
            b.skip(where, f"needs video_id, question_content, templ_values, anser, type: {e!r}")
    for vid, qas in videos.items():
        b.add(dict(ytid=vid, start=0, end=0, label="", split="", id=vid), music_avqa_id=vid,
              qa=json.dumps([q for _, q in sorted(qas, key=lambda x: x[0])]))
    return b.out


Adapter = Callable[..., DatasetManifest]
PATTERN_FIELDS = ("ytid", "start", "end", "label", "split", "id")

# dataset name -> (adapter, default file patterns relative to --root, trimmed files by default)
ADAPTERS: dict[str, tuple[Adapter, tuple[str, ...], bool]] = {
    "vggsound": (vggsound, ("{ytid}_{start:06d}.mp4",), True),
    # AVSpeechDownloader (naba89): <ytid>/<ytid>_<start>_<end>_video.mp4, earlier <ytid>_<start>_<end>.mp4,
    # with start / end as the CSV writes them
    "avspeech": (avspeech, ("{ytid}/{ytid}_{start_text}_{end_text}_video.mp4",
                            "{ytid}_{start_text}_{end_text}.mp4"), True),
    "kinetics": (kinetics, ("{label}/{ytid}_{start:06d}_{end:06d}.mp4", "{ytid}_{start:06d}_{end:06d}.mp4"), True),
    "audioset": (audioset, ("{ytid}.mp4",), False),
    "msrvtt": (msrvtt, ("{id}.mp4",), True),
    "vggss": (vggss, ("{id}.mp4",), True),
    "flickr_soundnet": (flickr_soundnet, ("{id}.mp4",), True),
    # MUSIC-AVQA releases its videos as <video_id>.mp4 (e.g. 00000272.mp4)
    "music-avqa": (music_avqa, ("{id}.mp4",), True),
}


def build(dataset: str, metadata: str, root: str, pattern: str | None = None, trimmed: bool | None = None,
          strict: bool = False, labels: str | None = None) -> DatasetManifest:
    """Run the adapter `dataset` on `metadata` (a file; the annotation folder for Flickr-SoundNet)
    with files under `root`. `pattern` / `trimmed` override the adapter's defaults; `labels` is
    AudioSet's class_labels_indices.csv (AudioSet only)."""
    if dataset not in ADAPTERS:
        raise ValueError(f"unknown dataset {dataset!r}; one of {sorted(ADAPTERS)}")
    fn, default_patterns, default_trimmed = ADAPTERS[dataset]
    if pattern is not None:
        allowed = set(PATTERN_FIELDS) | ({"start_text", "end_text"} if dataset in ("avspeech", "audioset") else set())
        try:
            names = {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
        except ValueError as e:
            raise ValueError(f"--pattern {pattern!r} is not a format string: {e}") from None
        if not names <= allowed:
            raise ValueError(f"--pattern {pattern!r} names {sorted(names - allowed)}; {dataset} file names "
                             f"can use {sorted(allowed)}")
    if not os.path.exists(metadata):
        raise FileNotFoundError(f"no such metadata file or folder: {metadata}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--root {root} is not a folder")
    kw: dict[str, Any] = {}
    if labels is not None:
        if dataset != "audioset":
            raise ValueError(f"--labels is AudioSet's class_labels_indices.csv; {dataset} has no label index")
        kw["labels"] = labels
    return fn(metadata, root, (pattern,) if pattern else default_patterns,
              trimmed=default_trimmed if trimmed is None else trimmed, strict=strict, **kw)


def write_jsonl(rows: Sequence[dict[str, Any]], out: str) -> None:
    """Rows as JSON lines (`path` first), written to a temp file and renamed into place."""
    tmp = f"{out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
