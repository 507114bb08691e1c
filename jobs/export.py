"""Export a checkpoint for serving and sharing: the weights without the optimizer's state.

The model is rebuilt from the checkpoint (a file that would not load is refused here, not at
serve time) and written again with what `avray serve`, `avray evaluate` and `avray embed` read:
the weights, the model config, the clip settings of its training data, its epoch and last
metrics, plus `exported`: the source file's sha1 and, with --trained-with, the command that trained it. A
third of the size of a training checkpoint; training cannot resume from it (no optimizer).

example:
  avray export runs/loc/model.pt checkpoints/localization.pt --trained-with "avray train --task localization ..."
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

KEPT = ("epoch", "clip_settings", "metrics")  # what of a training checkpoint's `extra` is exported


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: str = field(metadata={"help": "a checkpoint written by avray train (model.pt)", "positional": True})
    out: str = field(metadata={"help": "the exported checkpoint to write", "positional": True})
    trained_with: str | None = field(default=None, metadata={"help": "the command that trained it, kept in the export"})


def run(cfg: ExportConfig) -> int:
    from jobs.embed import checkpoint_id
    from jobs.tasks import load_checkpoint
    from models.checkpoint import save_checkpoint

    if os.path.exists(cfg.out) and os.path.samefile(cfg.checkpoint, cfg.out):
        raise ValueError("OUT must differ from the checkpoint: the export drops its training state")
    model, ckpt = load_checkpoint(cfg.checkpoint)
    if "clip_settings" not in ckpt["extra"]:
        raise ValueError(f"{cfg.checkpoint} has no clip_settings: serving could not decode uploads like its "
                         "training clips (checkpoints of avray train have them)")
    extra = {k: ckpt["extra"][k] for k in KEPT if k in ckpt["extra"]}
    extra["exported"] = {"from_sha1": checkpoint_id(cfg.checkpoint), "trained_with": cfg.trained_with}
    out = save_checkpoint(cfg.out, ckpt["model"], model, model.cfg, extra=extra)
    before, after = os.path.getsize(cfg.checkpoint), os.path.getsize(out)
    print(f"avray export: {ckpt['model']} checkpoint, epoch {int(extra.get('epoch', -1)) + 1}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB {out}")
    return 0


CONFIG = ExportConfig
