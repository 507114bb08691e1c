"""Evaluate a checkpoint of `avray train` on clip Parquet: metrics.json and figures.

The same task code as training's validation measures: localization cIoU@0.5 and AUC with the
clip's own audio, another clip's audio and silence (a localizer that ignores sound is caught);
separation SI-SDRi / SDRi, and with the wrong visual stream; captioning BLEU-4, CIDEr and how
often the sounding object is named first, with and without audio. Figures (PNG): heatmaps over
frames, spectrograms of mixture / estimate / reference, captions beside frames.

example:
  avray synth -o heldout --videos 40 --seed 999 && avray preprocess heldout/manifest.jsonl --out heldout-data --size 96
  avray evaluate --task localization --checkpoint runs/loc/model.pt --data heldout-data/clips --out eval/loc
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

from jobs.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    task: str = field(metadata={"help": "what the checkpoint does", "choices": tuple(TASKS)})
    checkpoint: str = field(metadata={"help": "model.pt (or any checkpoint) written by avray train"})
    data: str = field(metadata={"help": "clip Parquet folder to evaluate on (held-out videos)"})
    out: str = field(metadata={"help": "folder for metrics.json and figures", "short": "-o"})
    split: str = field(default="all", metadata={"help": "all clips, or only the videos avray train held out (val)", "choices": ("all", "val")})
    val_fraction: float = field(default=0.1, metadata={"help": "with --split val: the fraction used in training"})
    batch_size: int = field(default=32, metadata={"help": "clips per batch"})
    limit: int | None = field(default=None, metadata={"help": "evaluate at most this many clips"})
    examples: int = field(default=4, metadata={"help": "examples drawn in the figure"})


def run(cfg: EvaluateConfig) -> int:
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import torch

    from jobs.data import clip_folder, numpy_batches, validation_videos
    from pipelines.clipstore import location_name
    from jobs.tasks import get, load_checkpoint

    fs, root = clip_folder(cfg.data)  # local, or a URI (s3://...): resolved once, read through `fs`
    if cfg.batch_size < 2:
        raise ValueError("--batch-size must be >= 2")
    task = get(cfg.task)
    model, ckpt = load_checkpoint(cfg.checkpoint, task=cfg.task)
    flt = None
    if cfg.split == "val":
        ids = pads.dataset(root, format="parquet", filesystem=fs).to_table(columns=["video_id"]).column("video_id")
        flt = pc.is_in(pc.field("video_id"), value_set=validation_videos(ids, cfg.val_fraction))
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    clips = 0
    first: dict[str, torch.Tensor] | None = None

    def collated() -> Iterator[dict[str, torch.Tensor]]:
        nonlocal clips, first
        for b in numpy_batches(root, list(task.columns), cfg.batch_size, flt, cfg.limit, filesystem=fs):
            c = task.collate(b, model.cfg)
            clips += len(next(iter(c.values())))
            first = c if first is None else first
            yield c

    metrics = task.evaluate(model, collated(), model.cfg)
    if first is None:
        raise ValueError(f"no clips to evaluate in {cfg.data} (split {cfg.split})")
    figure = os.path.join(cfg.out, f"{cfg.task}.png")
    task.figure(model, first, model.cfg, figure, n=cfg.examples)
    report = {"task": cfg.task, "checkpoint": os.path.abspath(cfg.checkpoint), "data": location_name(cfg.data),
              "split": cfg.split, "clips": clips, "trained_epochs": ckpt["extra"].get("epoch", -1) + 1,
              "seconds": round(time.perf_counter() - t0, 2), "headline": task.headline(metrics), "metrics": metrics,
              "figure": figure}
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"avray evaluate {cfg.task}: {report['headline']}")
    print(f"  {clips} clips from {cfg.data}")
    for k, v in metrics.items():
        print(f"  {k:32s} {v:.4f}")
    print(f"  wrote {os.path.join(cfg.out, 'metrics.json')} and {figure}")
    return 0


CONFIG = EvaluateConfig
