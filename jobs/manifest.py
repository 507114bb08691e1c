"""Write an avray manifest from a standard dataset's own metadata and its usual file naming.

DATASET is one of vggsound, avspeech, kinetics (400/600/700), audioset, msrvtt, vggss,
flickr_soundnet, music-avqa; METADATA is its metadata file as published (vggsound.csv, an AVSpeech CSV, a
Kinetics CSV, an AudioSet segments CSV, MSR-VTT's videodatainfo JSON, vggss.json, avqa-train.json) or, for
Flickr-SoundNet, the folder of per-image XML annotations. Each row's file is looked up under
--root with the dataset's usual naming (see pipelines/datasets.py; --pattern overrides it) and
written, with the dataset's labels, captions, spans or boxes, as one JSONL row. Rows whose file is
absent stay in the manifest (preprocess records them as errors) and are counted; metadata rows
that cannot be parsed are skipped with their line number (--strict: refused).
With --no-trimmed the files are the untrimmed videos and the dataset's span becomes
segment_start_s / segment_end_s (only that segment is ingested).

example:
  avray manifest vggsound vggsound.csv --root videos/ --out vggsound.jsonl
  avray manifest audioset balanced_train_segments.csv --labels class_labels_indices.csv --root yt/ --out as.jsonl
  avray manifest kinetics kinetics_400/train.csv --root k400/train --pattern "{ytid}_{start:06d}_{end:06d}.mp4" --out k400.jsonl
  avray manifest music-avqa avqa-train.json --root MUSIC-AVQA-videos-Real/ --out avqa-train.jsonl
  avray preprocess vggsound.jsonl --out data/
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHOWN = 10  # missing files / skipped rows printed by name
DATASETS = ("vggsound", "avspeech", "kinetics", "audioset", "msrvtt", "vggss", "flickr_soundnet", "music-avqa")


@dataclass(frozen=True)
class ManifestConfig:
    dataset: str = field(metadata={"help": "the dataset whose metadata METADATA is", "positional": True,
                                   "choices": DATASETS})
    metadata: str = field(metadata={"help": "its metadata file (Flickr-SoundNet: the folder of .xml annotations)",
                                    "positional": True})
    root: str = field(metadata={"help": "folder holding the dataset's media files"})
    out: str = field(metadata={"help": "manifest to write (.jsonl)", "short": "-o"})
    pattern: str | None = field(default=None, metadata={
        "help": "file name under --root as a Python format string with {ytid} {start} {end} {start_text} {end_text} "
                "{label} {split} {id} "
                "(default: the dataset's usual naming)"})
    trimmed: bool | None = field(default=None, metadata={
        "help": "the files are the dataset's trimmed clips (span kept as youtube_start_s/youtube_end_s); "
                "--no-trimmed: untrimmed videos, span written as segment_start_s/segment_end_s "
                "(default: trimmed, except audioset)"})
    labels: str | None = field(default=None, metadata={
        "help": "AudioSet's class_labels_indices.csv: adds the display names of each row's label mids"})
    strict: bool = field(default=False, metadata={"help": "refuse metadata with unparseable rows instead of skipping them"})


def run(cfg: ManifestConfig) -> int:
    from pipelines.datasets import build, write_jsonl

    if not cfg.out.endswith(".jsonl"):
        raise ValueError(f"--out {cfg.out} must end in .jsonl (avray preprocess reads manifests by extension)")
    m = build(cfg.dataset, cfg.metadata, cfg.root, pattern=cfg.pattern, trimmed=cfg.trimmed,
              strict=cfg.strict, labels=cfg.labels)
    write_jsonl(m.rows, cfg.out)
    print(f"avray manifest {cfg.dataset}: {len(m.rows)} row(s) -> {cfg.out}; "
          f"{len(m.missing)} file(s) missing under {cfg.root}; {len(m.skipped)} metadata row(s) skipped")
    for path in m.missing[:SHOWN]:
        print(f"  missing {path}")
    if len(m.missing) > SHOWN:
        print(f"  ... and {len(m.missing) - SHOWN} more missing")
    for where, why in m.skipped[:SHOWN]:
        print(f"  skipped {where}: {why}")
    if len(m.skipped) > SHOWN:
        print(f"  ... and {len(m.skipped) - SHOWN} more skipped")
    return 0


CONFIG = ManifestConfig
