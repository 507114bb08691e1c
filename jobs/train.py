"""Train a model on clip Parquet with Ray Train (TorchTrainer), streaming the clips.

Tasks (jobs/tasks): localization (sound source localization, Senocak et al. / EZ-VSL),
separation (audio-visual speech separation, Looking to Listen; presets `tiny-audio-only` /
`paper-audio-only` train the audio-only PIT baseline) and captioning (Show, Attend and Tell
over the clip's frames, with its audio; the vocabulary comes from the training captions). What
a task fits on the training clips first (captioning: its vocabulary) goes into the model
config. The clips are split into train and validation by video id (never a video in both), streamed to the workers with
`get_dataset_shard(...).iter_torch_batches`, and every epoch writes a checkpoint under RUN
(the one avray format: model name, config, state_dict, extra) plus a line of
RUN/metrics.jsonl; RUN/model.pt is the latest. A worker that dies is replaced and training
resumes from the last checkpoint (--max-failures); --resume continues a stopped run.

example:
  avray preprocess media/manifest.jsonl --out data/ --size 96 --fps 8
  avray train --task localization --data data/clips --out runs/loc --preset tiny --epochs 10
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from jobs.data import SHUFFLE_BATCHES
from jobs.tasks import TASKS

log = logging.getLogger(__name__)

_NOT_PRINTED = ("epoch", "start_epoch", "started_at")  # metrics.jsonl fields left out of the progress lines


@dataclass(frozen=True)
class TrainConfig:
    task: str = field(metadata={"help": "what to train", "choices": tuple(TASKS)})
    data: str = field(metadata={"help": "clip Parquet folder (OUT/clips of avray preprocess)"})
    out: str = field(metadata={"help": "run folder: checkpoints, metrics.jsonl, model.pt", "short": "-o"})
    preset: str = field(default="tiny", metadata={"help": "model preset (tiny, paper; separation also *-audio-only)"})
    epochs: int = field(default=10, metadata={"help": "passes over the training clips"})
    batch_size: int = field(default=32, metadata={"help": "clips per step and worker"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (the peak, with --lr-schedule cosine)"})
    lr_schedule: str = field(default="auto", metadata={
        "help": "cosine: decay the learning rate per step from --lr to 0 over --epochs; constant: keep it; "
                "auto: the task's default (constant for localization, whose tiny model learned to ignore the "
                "sound with the decay, and for separation, which learned slower; cosine otherwise)",
        "choices": ("auto", "cosine", "constant")})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay"})
    shuffle: bool = field(default=True, metadata={
        "help": f"each epoch, draw every training batch at random from a buffer of {SHUFFLE_BATCHES} batches' "
                f"clips (--no-shuffle: file order, the same batches every epoch)"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of videos held out for validation"})
    num_workers: int = field(default=1, metadata={"help": "Ray Train workers"})
    torch_threads: int = field(default=0, metadata={
        "help": "torch threads per worker (0: the worker's CPUs, 1 by default); on a machine whose other "
                "cores only feed data, up to its core count"})
    use_gpu: str = field(default="auto", metadata={"help": "auto: GPUs when the cluster has them or its autoscaler may launch GPU nodes", "choices": ("auto", "yes", "no")})
    seed: int = field(default=0, metadata={"help": "random seed"})
    visual_weights: str | None = field(default=None, metadata={"help": "local torchvision ResNet-18 state dict for the visual trunk"})
    teacher_weights: str | None = field(default=None, metadata={
        "help": "soundnet: the frozen visual teacher of a distilling preset (tiny, paper): the model.pt of a "
                "--preset tiny-teacher run, or a local torchvision ResNet-18 classifier state dict WITH its fc "
                "head (ImageNet: the classes become its 1,000 categories)"})
    max_failures: int = field(default=2, metadata={"help": "worker failures to recover from (from the last checkpoint)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in OUT from its last checkpoint"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else a local Ray)"})


def model_config(cfg: TrainConfig):
    """The config of `cfg.task`'s `cfg.preset`, with the local visual and teacher weights (before fitting)."""
    from dataclasses import replace

    from jobs.tasks import get

    task = get(cfg.task)
    if cfg.preset not in task.presets:
        raise ValueError(f"unknown preset {cfg.preset!r} for {cfg.task}; choose from {sorted(task.presets)}")
    mcfg = task.presets[cfg.preset]
    if cfg.visual_weights:
        if not hasattr(mcfg, "visual"):
            raise ValueError(f"--visual-weights applies to models with a ResNet visual trunk, not {cfg.task}")
        if not os.path.isfile(cfg.visual_weights):
            raise FileNotFoundError(f"no such weights file: {cfg.visual_weights}")
        mcfg = replace(mcfg, visual=replace(mcfg.visual, weights=os.path.abspath(cfg.visual_weights)))
    if cfg.teacher_weights or (hasattr(mcfg, "teacher") and getattr(mcfg, "mode", None) == "distill"):
        from models.soundnet import with_teacher_weights

        if not hasattr(mcfg, "teacher"):
            raise ValueError(f"--teacher-weights applies to models with a visual teacher (soundnet), not {cfg.task}")
        if not cfg.teacher_weights:
            raise ValueError(f"--preset {cfg.preset} distills a frozen visual teacher: give --teacher-weights (the "
                             "model.pt of a --preset tiny-teacher run, or a torchvision ResNet-18 classifier state dict)")
        mcfg = with_teacher_weights(mcfg, os.path.abspath(cfg.teacher_weights))
    return mcfg


def cosine_schedule(opt, total_steps: int):
    """A LambdaLR scaling the learning rate by 0.5 (1 + cos(pi step / total_steps)): from the
    optimizer's lr down to 0 at `total_steps` (and 0 after)."""
    import math

    import torch

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_epoch(model, opt, batches, task, mcfg, gen, device, amp: bool, sched=None) -> dict[str, float]:
    """One pass over `batches` (an iterable of prepared tensor dicts, `task.prepare` as tensors):
    the step code of every worker, also used by benchmarks/train.py's plain loop. `sched`: a
    per-step learning-rate scheduler, or None. "Data wait" is the time spent in next() on the
    iterator. Returns train_loss, steps, samples_per_s (this process), data_wait_fraction,
    epoch_seconds, started_at (Unix time of the epoch's start) and lr (at the epoch's end)."""
    import torch

    from jobs.tasks.base import on_device

    model.train()
    started_at = time.time()
    t0 = time.perf_counter()
    wait = 0.0
    steps = samples = 0
    loss_sum = 0.0
    it = iter(batches)
    while True:
        tw = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - tw
        if batch is None:
            break
        batch = on_device(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            losses = task.step(model, batch, mcfg, gen)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_sum += float(losses["loss"].detach())
        steps += 1
        samples += len(next(iter(batch.values())))
    seconds = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(steps, 1), "steps": steps,
            "samples_per_s": samples / seconds if seconds else 0.0,
            "data_wait_fraction": wait / seconds if seconds else 0.0, "epoch_seconds": seconds,
            "started_at": started_at, "lr": opt.param_groups[0]["lr"]}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the model (resumed from the last checkpoint, if any), then per
    epoch train_epoch, the task's validation metrics, a metrics.jsonl line and a checkpoint."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch

    from jobs.data import read_ahead, torch_batches
    from jobs.tasks import get, load_checkpoint
    from jobs.tasks.base import on_device
    from models.checkpoint import save_checkpoint

    task, mcfg, epochs = get(config["task"]), config["model_config"], config["epochs"]
    if config["torch_threads"]:
        torch.set_num_threads(config["torch_threads"])
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"] + rank)
    gen = torch.Generator().manual_seed(config["seed"] + 1000 * rank)
    device = ray.train.torch.get_device()

    def batches(name: str):  # rows arrive prepared (task.prepare ran in Ray Data tasks): only tensors here
        return torch_batches(ray.train.get_dataset_shard(name), config["batch_size"], train=name == "train",
                             shuffle=config["shuffle"], gen=gen, device=device)

    saved = None
    if (ckpt := ray.train.get_checkpoint()) is not None:  # restarted after a failure, or --resume
        with ckpt.as_directory() as d:
            restored, saved = load_checkpoint(os.path.join(d, "model.pt"))
    start_epoch = 0 if saved is None else saved["extra"]["epoch"] + 1
    # Each epoch's first training batch is fetched ahead: the first while the model is set up,
    # the next ones during the previous epoch's validation and checkpoint.
    train_batches = read_ahead(batches("train")) if start_epoch < epochs else iter(())
    core = task.model(mcfg) if saved is None else restored
    model = ray.train.torch.prepare_model(core)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = cosine_schedule(opt, epochs * config["steps_per_epoch"]) if config["lr_schedule"] == "cosine" else None
    if saved is not None:
        if "optimizer" not in saved["extra"]:
            raise ValueError("the checkpoint to resume from has no optimizer state (an avray export?): "
                             "resume from a run folder of avray train")
        opt.load_state_dict(saved["extra"]["optimizer"])
        if sched is not None and saved["extra"].get("scheduler") is not None:
            sched.load_state_dict(saved["extra"]["scheduler"])

    for epoch in range(start_epoch, epochs):
        stats = train_epoch(model, opt, train_batches, task, mcfg, gen, device, device.type == "cuda", sched)
        if epoch + 1 < epochs:
            train_batches = read_ahead(batches("train"))
        model.eval()
        val = task.evaluate(core, (on_device(b, device) for b in batches("val")), mcfg)
        metrics = {"epoch": epoch, "start_epoch": start_epoch, **stats, "torch_threads": torch.get_num_threads(),
                   "samples_per_s": stats["samples_per_s"] * ctx.get_world_size(),
                   **{f"val_{k}": v for k, v in val.items()}}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                with open(os.path.join(config["run_dir"], "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                print(f"[avray train] epoch {epoch + 1}/{epochs}: "
                      + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in _NOT_PRINTED), flush=True)
                save_checkpoint(os.path.join(d, "model.pt"), task.name, core, mcfg,
                                extra={"epoch": epoch, "optimizer": opt.state_dict(),
                                       "scheduler": None if sched is None else sched.state_dict(),
                                       "clip_settings": config["clip_settings"],
                                       "metrics": {k: float(v) for k, v in metrics.items()}})
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


RUN_KEYS = ("carried_columns", "keyframes_only")  # what OUT/_config.json holds besides the ClipSettings


def clip_settings_of(data: str):
    """The ClipSettings of a clip folder (local or a URI): OUT/_config.json beside OUT/clips, as
    avray preprocess wrote it."""
    import posixpath

    import pyarrow.fs as pafs

    from pipelines.clipsettings import ClipSettings
    from pipelines.clipstore import filesystem

    fs, root = filesystem(data)
    path = posixpath.join(posixpath.dirname(root.rstrip("/")), "_config.json")
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no {path}: avray train needs the clip settings that avray preprocess writes "
                                "beside OUT/clips (they travel in the checkpoint to avray serve)")
    with fs.open_input_stream(path) as f:
        d = json.loads(f.read())
    return ClipSettings.from_dict({k: v for k, v in d.items() if k not in RUN_KEYS})


def run(cfg: TrainConfig) -> int:
    import functools
    import shutil

    import pyarrow.dataset as pads
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.data import clip_dataset, clip_files, clip_folder, keep_idle_workers, split_store, validation_videos
    from jobs.placement import offered, train_worker_resources
    from jobs.tasks import get
    from pipelines.schema import numpy_batch

    fs, data = clip_folder(cfg.data)  # local, or a URI (s3://...): read through pyarrow.fs
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.num_workers < 1 or cfg.torch_threads < 0:
        raise ValueError("--epochs and --num-workers must be >= 1, --batch-size >= 2, --torch-threads >= 0")
    task = get(cfg.task)
    preset = model_config(cfg)  # bad presets / weights fail here, before Ray starts
    clip_settings = clip_settings_of(cfg.data).to_dict()
    run_dir = os.path.abspath(cfg.out)
    storage, name = os.path.dirname(run_dir), os.path.basename(run_dir)
    if os.path.isdir(run_dir) and os.listdir(run_dir) and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    os.makedirs(run_dir, exist_ok=True)

    started = False
    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        keep_idle_workers()
        ray.init(address=address, include_dashboard=False)
        started = True
    try:
        ds = pads.dataset(clip_files(data, fs), format="parquet", filesystem=fs)
        columns = [c for c in task.columns if c in ds.schema.names]
        ids = pads.dataset(data, format="parquet", filesystem=fs).to_table(columns=["video_id", "__filename"])
        train_split, val_split = split_store(ids, validation_videos(ids.column("video_id"), cfg.val_fraction), fs,
                                             ds.schema)
        mcfg = task.fit(preset, lambda cols: numpy_batch(train_split.read([c for c in cols if c in ds.schema.names])))
        prepare = functools.partial(task.prepare, cfg=mcfg)
        # auto: GPUs when a node has them or the autoscaler may launch one (cluster.yaml's GPU workers
        # start at min_workers 0), so the `train` marker never lands a CPU-only run on a GPU node
        use_gpu = cfg.use_gpu == "yes" if cfg.use_gpu != "auto" else offered("GPU")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"task": cfg.task, "model_config": mcfg, "epochs": cfg.epochs, "seed": cfg.seed,
                               "run_dir": run_dir, "clip_settings": clip_settings,
                               "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                               "lr_schedule": task.lr_schedule if cfg.lr_schedule == "auto" else cfg.lr_schedule,
                               "torch_threads": cfg.torch_threads, "shuffle": cfg.shuffle,
                               # drop_last: each worker's shard gives floor(rows / batch) steps
                               "steps_per_epoch": max(1, train_split.rows // (cfg.batch_size * cfg.num_workers))},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=train_worker_resources(use_gpu)),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
            datasets={"train": clip_dataset(train_split, columns, prepare, cfg.batch_size),
                      "val": clip_dataset(val_split, columns, prepare, cfg.batch_size)},
            dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        )
        result = trainer.fit()
    finally:
        if started:
            ray.shutdown()
    if result.error:
        raise result.error
    history = _write_history(run_dir)
    with result.checkpoint.as_directory() as d:
        shutil.copy(os.path.join(d, "model.pt"), os.path.join(run_dir, "model.pt"))
    last = history[-1]
    print(f"avray train {cfg.task}: {len(history)} epoch(s) in {run_dir}; last: "
          + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float) and k not in _NOT_PRINTED))
    print(f"  checkpoint: {os.path.join(run_dir, 'model.pt')}   metrics: {os.path.join(run_dir, 'metrics.jsonl')}")
    return 0


def _write_history(run_dir: str) -> list[dict[str, Any]]:
    """RUN/metrics.jsonl, one line per epoch: an epoch redone after a failure keeps its last line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    rows: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[int(r["epoch"])] = r
    ordered = [rows[e] for e in sorted(rows)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in ordered)
    return ordered


CONFIG = TrainConfig
