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
from typing import Any, Iterator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    task: str = field(metadata={"help": "what the checkpoint does", "choices": ("localization", "separation", "captioning")})
    checkpoint: str = field(metadata={"help": "model.pt (or any checkpoint) written by avray train"})
    data: str = field(metadata={"help": "clip Parquet folder to evaluate on (held-out videos)"})
    out: str = field(metadata={"help": "folder for metrics.json and figures", "short": "-o"})
    split: str = field(default="all", metadata={"help": "all clips, or only the videos avray train held out (val)", "choices": ("all", "val")})
    val_fraction: float = field(default=0.1, metadata={"help": "with --split val: the fraction used in training"})
    batch_size: int = field(default=32, metadata={"help": "clips per batch"})
    limit: int | None = field(default=None, metadata={"help": "evaluate at most this many clips"})
    examples: int = field(default=4, metadata={"help": "examples drawn in the figure"})


def _batches(cfg: EvaluateConfig, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Clip rows as numpy dicts (`pipelines.schema.numpy_batch`), `cfg.batch_size` rows each
    (the last one may be shorter). pyarrow yields at most batch_size rows per record batch and never
    spans two files, and a file holds one video's clips, so record batches are re-batched here:
    separation mixes and localization swaps audio within a batch, which must hold several videos."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from jobs.train import validation_videos
    from pipelines.schema import numpy_batch

    ds = pads.dataset(cfg.data, format="parquet")
    cols = [c for c in columns if c in ds.schema.names]
    flt = None
    if cfg.split == "val":
        val = validation_videos(ds.to_table(columns=["video_id"]).column("video_id"), cfg.val_fraction)
        flt = pc.is_in(pc.field("video_id"), value_set=val)

    left = cfg.limit
    buf: list = []
    rows = 0
    for rb in ds.to_batches(columns=cols, filter=flt, batch_size=cfg.batch_size):
        if left is not None:
            rb = rb.slice(0, max(left, 0))
            left -= rb.num_rows
        if rb.num_rows:
            buf.append(rb)
            rows += rb.num_rows
        while rows >= cfg.batch_size:
            table = pa.Table.from_batches(buf)
            yield numpy_batch(table.slice(0, cfg.batch_size))
            rest = table.slice(cfg.batch_size)
            buf, rows = rest.to_batches(), rest.num_rows
        if left is not None and left <= 0:
            break
    if rows:
        yield numpy_batch(pa.Table.from_batches(buf))


def run(cfg: EvaluateConfig) -> int:
    import torch

    from jobs.tasks import TASKS, CaptioningTask
    from models.checkpoint import load_checkpoint

    if not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"no clip folder at {cfg.data}")
    if cfg.batch_size < 2:
        raise ValueError("--batch-size must be >= 2")
    model, ckpt = load_checkpoint(cfg.checkpoint)
    task = TASKS[cfg.task]
    if ckpt["model"] != task.model:
        raise ValueError(f"{cfg.checkpoint} holds a {ckpt['model']} model, not {cfg.task}")
    if cfg.task == "captioning":
        task = CaptioningTask(model.cfg.vocab)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()
    clips = 0
    first: dict[str, torch.Tensor] | None = None

    def collated() -> Iterator[dict[str, torch.Tensor]]:
        nonlocal clips, first
        for b in _batches(cfg, task.columns):
            c = task.collate(b)
            clips += len(next(iter(c.values())))
            first = c if first is None else first
            yield c

    metrics = task.evaluate(model, collated(), model.cfg)
    if first is None:
        raise ValueError(f"no clips to evaluate in {cfg.data} (split {cfg.split})")
    figure = os.path.join(cfg.out, f"{cfg.task}.png")
    task.figure(model, first, model.cfg, figure, n=cfg.examples)
    report = {"task": cfg.task, "checkpoint": os.path.abspath(cfg.checkpoint), "data": os.path.abspath(cfg.data),
              "split": cfg.split, "clips": clips, "trained_epochs": ckpt["extra"].get("epoch", -1) + 1,
              "seconds": round(time.perf_counter() - t0, 2), "metrics": metrics, "figure": figure}
    with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"avray evaluate {cfg.task}: {clips} clips from {cfg.data}")
    for k, v in metrics.items():
        print(f"  {k:32s} {v:.4f}")
    print(f"  wrote {os.path.join(cfg.out, 'metrics.json')} and {figure}")
    return 0


CONFIG = EvaluateConfig
