"""Train a model on clip Parquet with Ray Train (TorchTrainer), streaming the clips.

Tasks: localization (sound source localization, Senocak et al. / EZ-VSL), separation
(audio-visual speech separation, Looking to Listen; presets `tiny-audio-only` /
`paper-audio-only` train the audio-only PIT baseline) and captioning (Show, Attend and Tell
over the clip's frames, with its audio; the vocabulary comes from the training captions). The clips are split into train and
validation by video id (never a video in both), streamed to the workers with
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
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

SHUFFLE_BATCHES = 8  # --shuffle: batches are drawn from a buffer of this many batches' clips
_NOT_PRINTED = ("epoch", "start_epoch", "started_at")  # metrics.jsonl fields left out of the progress lines
IDLE_WORKERS = 4  # at least this many idle worker processes a local Ray started by avray keeps


def keep_idle_workers(n: int = IDLE_WORKERS) -> None:
    """Let a local Ray started after this call keep up to max(`n`, 2 x CPU count) idle worker
    processes (RAY_num_workers_soft_limit, unless already set; a Ray that is already running keeps
    its own).

    By default Ray keeps only as many idle workers as there are CPUs, and kills the rest, so the
    next use starts a fresh process that imports torch again. avray train runs two pipelines of
    read tasks: the training split (up to a task per free CPU) and the validation split (up to a
    task per block, at once), so at each epoch's end more workers fall idle than there are CPUs.
    Measured: on 2 cores, 4.5 s of every epoch and as long again for each validation pass went to
    restarting the read tasks' worker; on a 16-CPU H100 node, separation (paper preset) ran epochs
    2-4 at 34, 114 and 33 clips/s with the default limit of 16, and at 111, 110 and 109 with 40."""
    os.environ.setdefault("RAY_num_workers_soft_limit", str(max(n, 2 * (os.cpu_count() or 1))))


@dataclass(frozen=True)
class TrainConfig:
    task: str = field(metadata={"help": "what to train", "choices": ("localization", "separation", "captioning")})
    data: str = field(metadata={"help": "clip Parquet folder (OUT/clips of avray preprocess)"})
    out: str = field(metadata={"help": "run folder: checkpoints, metrics.jsonl, model.pt", "short": "-o"})
    preset: str = field(default="tiny", metadata={"help": "model preset (tiny, paper; separation also *-audio-only)"})
    epochs: int = field(default=10, metadata={"help": "passes over the training clips"})
    batch_size: int = field(default=32, metadata={"help": "clips per step and worker"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (the peak, with --lr-schedule cosine)"})
    lr_schedule: str = field(default="auto", metadata={
        "help": "cosine: decay the learning rate per step from --lr to 0 over --epochs; constant: keep it; "
                "auto: constant for localization (cosine let it ignore the sound) and separation (cosine learned "
                "slower), cosine for captioning",
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
    use_gpu: str = field(default="auto", metadata={"help": "auto: GPUs when the cluster has them", "choices": ("auto", "yes", "no")})
    seed: int = field(default=0, metadata={"help": "random seed"})
    visual_weights: str | None = field(default=None, metadata={"help": "local torchvision ResNet-18 state dict for the visual trunk"})
    max_failures: int = field(default=2, metadata={"help": "worker failures to recover from (from the last checkpoint)"})
    resume: bool = field(default=False, metadata={"help": "continue the run in OUT from its last checkpoint"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else a local Ray)"})


def is_validation(video_id: str, fraction: float) -> bool:
    """Deterministic split by video: the first 8 hex digits of the id, as a fraction of 2**32."""
    return int(video_id[:8], 16) / 2**32 < fraction


def validation_videos(video_ids, fraction: float):
    """The held-out videos: those `is_validation` picks, but at least one, and never all (a
    small dataset could otherwise get an empty split). Returns a pyarrow string array."""
    import pyarrow as pa

    ids = sorted(set(video_ids.to_pylist()))
    if len(ids) < 2:
        raise ValueError(f"need clips of at least 2 videos to hold some out, got {len(ids)}")
    val = [v for v in ids if is_validation(v, fraction)] or ids[:1]  # ids[:1]: the smallest hash
    if len(val) == len(ids):
        val = val[:-1]
    return pa.array(val, pa.string())


def model_config(cfg: TrainConfig, vocab: tuple[str, ...] = ()):
    """The model config of `cfg.task` / `cfg.preset` (plus the local visual weights); captioning
    presets are functions of the vocabulary."""
    from dataclasses import replace

    from jobs.tasks import TASKS

    task = TASKS[cfg.task]
    if cfg.preset not in task.configs:
        raise ValueError(f"unknown preset {cfg.preset!r} for {cfg.task}; choose from {sorted(task.configs)}")
    mcfg = task.configs[cfg.preset]
    mcfg = mcfg(vocab) if callable(mcfg) else mcfg
    if cfg.visual_weights:
        if not hasattr(mcfg, "visual"):
            raise ValueError(f"--visual-weights applies to models with a ResNet visual trunk, not {cfg.task}")
        if not os.path.isfile(cfg.visual_weights):
            raise FileNotFoundError(f"no such weights file: {cfg.visual_weights}")
        mcfg = replace(mcfg, visual=replace(mcfg.visual, weights=os.path.abspath(cfg.visual_weights)))
    return mcfg


def cosine_schedule(opt, total_steps: int):
    """A LambdaLR scaling the learning rate by 0.5 (1 + cos(pi step / total_steps)): from the
    optimizer's lr down to 0 at `total_steps` (and 0 after)."""
    import math

    import torch

    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def on_device(batch, device):
    """A prepared tensor batch moved to `device`, as the model takes it (jobs.tasks.to_model)."""
    from jobs.tasks import to_model
    return to_model({k: v.to(device, non_blocking=True) for k, v in batch.items()})


def torch_batches(data, batch_size: int, train: bool, shuffle: bool, gen=None, device=None):
    """Tensor batches of a Ray Dataset or dataset shard, 2 batches prefetched. In training the
    last, partial batch is dropped and, with `shuffle`, every batch is drawn at random from a
    buffer of SHUFFLE_BATCHES batches' rows (`shuffled_batches`, with `gen`; on `device` when
    given), a new draw each epoch, so batches do not hold the same clips every epoch, nor always
    both clips of a video (they share a file)."""
    it = data.iter_torch_batches(batch_size=batch_size, prefetch_batches=2, drop_last=train and not shuffle)
    if train and shuffle:
        return shuffled_batches(it, batch_size, SHUFFLE_BATCHES * batch_size, gen, device)
    return it


def shuffled_batches(batches, batch_size: int, buffer_rows: int, gen=None, device=None):
    """Re-batch an iterable of tensor batches (dicts of tensors of equal length) into batches of
    `batch_size` rows drawn uniformly at random, without replacement, from a buffer: incoming
    batches fill it to at least `buffer_rows` rows (or until they run out), and refill it so after
    every batch drawn. The last, partial batch is dropped. `gen`: the
    torch.Generator of the draws. With `device`, incoming batches move there first and the draws
    gather there.

    A drawn batch holds its rows grouped by the incoming batch they came from (the draw itself is
    uniform). Each row is copied once (index_select into the drawn batch); Ray Data's local
    shuffle buffer (`iter_torch_batches(local_shuffle_buffer_size=...)`) copies every row 3-4
    times (compaction, concatenation, take) and gave ~1,000-1,800 rows/s of 224-px localization
    rows on one core of a 2-core machine (this: 9,000-15,000), against the ~3,300 samples/s an H100
    trains the paper preset at (BENCHMARKS.md)."""
    import torch

    pool: list[tuple[dict, torch.Tensor]] = []  # (incoming batch, indices of its rows not yet drawn)
    it = iter(batches)

    def rows() -> int:
        return sum(len(left) for _, left in pool)

    def refill(target: int) -> None:
        while rows() < target:
            b = next(it, None)
            if b is None:
                return
            if device is not None:
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
            pool.append((b, torch.arange(len(next(iter(b.values()))))))

    refill(buffer_rows)
    while rows() >= batch_size:
        sizes = torch.tensor([len(left) for _, left in pool])
        ends = sizes.cumsum(0)
        pick = torch.randperm(int(ends[-1]), generator=gen)[:batch_size].sort().values
        owner = torch.searchsorted(ends, pick, right=True)  # the pool entry of each drawn row
        starts = ends - sizes
        out = {k: v.new_empty((batch_size, *v.shape[1:])) for k, v in pool[0][0].items()}
        pos, kept = 0, []
        for i, (b, left) in enumerate(pool):
            chosen = pick[owner == i] - starts[i]
            if len(chosen):
                idx = left[chosen]
                for k, v in b.items():
                    torch.index_select(v, 0, idx.to(v.device), out=out[k][pos:pos + len(idx)])
                pos += len(idx)
                mask = torch.ones(len(left), dtype=torch.bool)
                mask[chosen] = False
                left = left[mask]
            if len(left):
                kept.append((b, left))
        pool[:] = kept
        yield out
        refill(buffer_rows)


def read_ahead(items: Iterable[Any]) -> Iterator[Any]:
    """Iterate `items`, whose first item a background thread starts fetching at once: a Ray
    Data pipeline starts, and the shuffle buffer fills, while the caller does other work
    (building the model, validating, checkpointing). An exception raised fetching it is raised
    by the first next().

    Measured (benchmarks/train.py's localization, 2 cores): each epoch's first batch, a new
    streaming execution plus SHUFFLE_BATCHES read tasks, took 0.52-0.56 s of a 6.6-6.8 s epoch;
    fetched ahead during validation, 0 s, and the epoch 6.0-6.1 s."""
    import threading

    it = iter(items)
    first: dict[str, Any] = {}

    def fetch() -> None:
        try:
            first["item"] = next(it, first)  # `first` itself marks an empty iterator
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            first["error"] = e

    thread = threading.Thread(target=fetch, name="avray-read-ahead", daemon=True)
    thread.start()

    def consume() -> Iterator[Any]:
        thread.join()
        if "error" in first:
            raise first["error"]
        if first["item"] is not first:
            yield first["item"]
            yield from it
    return consume()


def train_epoch(model, opt, batches, task, mcfg, gen, device, amp: bool, sched=None) -> dict[str, float]:
    """One pass over `batches` (an iterable of prepared tensor dicts, `task.prepare` as tensors):
    the step code of every worker, also used by benchmarks/train.py's plain loop. `sched`: a
    per-step learning-rate scheduler, or None. "Data wait" is the time spent in next() on the
    iterator. Returns train_loss, steps, samples_per_s (this process), data_wait_fraction,
    epoch_seconds, started_at (Unix time of the epoch's start) and lr (at the epoch's end)."""
    import torch

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
    """Runs on every Ray Train worker."""
    import tempfile

    import ray.train
    import ray.train.torch
    import torch

    from models.checkpoint import build_model, load_checkpoint, save_checkpoint

    task, mcfg = config["task"], config["model_config"]
    if config["torch_threads"]:
        torch.set_num_threads(config["torch_threads"])
    threads = torch.get_num_threads()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"] + rank)
    gen = torch.Generator().manual_seed(config["seed"] + 1000 * rank)
    device = ray.train.torch.get_device()

    def batches(name: str):
        # rows arrive prepared (task.prepare ran in Ray Data tasks); here they only become tensors
        train = name == "train"
        return torch_batches(ray.train.get_dataset_shard(name), config["batch_size"], train=train,
                             shuffle=config["shuffle"], gen=gen, device=device)

    saved = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # restarted after a failure, or --resume
        with ckpt.as_directory() as d:
            restored, saved = load_checkpoint(os.path.join(d, "model.pt"))
    start_epoch = 0 if saved is None else saved["extra"]["epoch"] + 1
    # Each epoch's first training batch is fetched ahead: the first while the model is set up,
    # the next ones during the previous epoch's validation and checkpoint.
    train_batches = read_ahead(batches("train")) if start_epoch < config["epochs"] else iter(())
    model = build_model(task.model, mcfg)
    if saved is not None:
        model.load_state_dict(restored.state_dict())
    model = ray.train.torch.prepare_model(model)
    opt = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    sched = None
    if config["lr_schedule"] == "cosine":
        sched = cosine_schedule(opt, config["epochs"] * config["steps_per_epoch"])
    if saved is not None:
        opt.load_state_dict(saved["extra"]["optimizer"])
        if sched is not None and saved["extra"].get("scheduler") is not None:
            sched.load_state_dict(saved["extra"]["scheduler"])
    amp = device.type == "cuda"
    core = model.module if hasattr(model, "module") else model

    for epoch in range(start_epoch, config["epochs"]):
        stats = train_epoch(model, opt, train_batches, task, mcfg, gen, device, amp, sched)
        if epoch + 1 < config["epochs"]:
            train_batches = read_ahead(batches("train"))
        model.eval()
        val = task.evaluate(core, (on_device(b, device) for b in batches("val")), mcfg)
        metrics = {"epoch": epoch, "start_epoch": start_epoch, **stats, "torch_threads": threads,
                   "samples_per_s": stats["samples_per_s"] * ctx.get_world_size(),
                   **{f"val_{k}": v for k, v in val.items()}}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                with open(os.path.join(config["run_dir"], "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                print(f"[avray train] epoch {epoch + 1}/{config['epochs']}: "
                      + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in _NOT_PRINTED),
                      flush=True)
                save_checkpoint(os.path.join(d, "model.pt"), task.model, core, mcfg,
                                extra={"epoch": epoch, "optimizer": opt.state_dict(),
                                       "scheduler": None if sched is None else sched.state_dict(),
                                       "clip_settings": config["clip_settings"],
                                       "metrics": {k: float(v) for k, v in metrics.items()}})
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)


def run(cfg: TrainConfig) -> int:
    import shutil

    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.tasks import TASKS

    if not os.path.isdir(cfg.data):
        raise FileNotFoundError(f"no clip folder at {cfg.data} (run avray preprocess first)")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {cfg.val_fraction}")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.num_workers < 1 or cfg.torch_threads < 0:
        raise ValueError("--epochs and --num-workers must be >= 1, --batch-size >= 2, --torch-threads >= 0")
    task = TASKS[cfg.task]
    from models.captioning import SPECIALS
    model_config(cfg, SPECIALS)  # bad presets / weights fail here, before Ray starts
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
        import pyarrow.dataset as pads
        import pyarrow.parquet as pq
        present = set(pq.read_schema(next(p for p in sorted(_parts(cfg.data)))).names)
        columns = [c for c in task.columns if c in present]
        ids = pads.dataset(cfg.data, format="parquet").to_table(columns=["video_id", "__filename"])
        val_ids = validation_videos(ids.column("video_id"), cfg.val_fraction)
        train_split, val_split = _split(ids, val_ids)
        vocab: tuple[str, ...] = ()
        if cfg.task == "captioning":  # the vocabulary of the training captions, stored in the model config
            from jobs.tasks import CaptioningTask, clip_captions
            from models.captioning import build_vocab
            from pipelines.schema import numpy_batch
            caps = clip_captions(numpy_batch(train_split.read([c for c in columns if c not in ("frames", "logmel")])))
            vocab = build_vocab(caps)
            task = CaptioningTask(vocab)
            log.info("vocabulary: %d words from %d training captions", len(vocab), len(caps))
        mcfg = model_config(cfg, vocab)
        # How the clips were made (OUT/_config.json of avray preprocess), kept in every checkpoint
        # so that avray serve decodes uploads the same way.
        settings_path = os.path.join(os.path.dirname(os.path.abspath(cfg.data)), "_config.json")
        clip_settings: dict[str, Any] = {}
        if os.path.isfile(settings_path):
            with open(settings_path) as f:
                clip_settings = {k: v for k, v in json.load(f).items() if k != "carried_columns"}
        use_gpu = {"yes": True, "no": False}.get(cfg.use_gpu, ray.cluster_resources().get("GPU", 0) > 0)
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"task": task, "model_config": mcfg, "epochs": cfg.epochs, "seed": cfg.seed,
                               "run_dir": run_dir, "clip_settings": clip_settings,
                               "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                               "lr_schedule": task.lr_schedule if cfg.lr_schedule == "auto" else cfg.lr_schedule,
                               "torch_threads": cfg.torch_threads,
                               "shuffle": cfg.shuffle,
                               # drop_last: each worker's shard gives floor(rows / batch) steps
                               "steps_per_epoch": max(1, train_split.rows // (cfg.batch_size * cfg.num_workers))},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(
                name=name, storage_path=storage,
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures)),
            datasets={"train": clip_dataset(train_split, columns, task.prepare, cfg.batch_size),
                      "val": clip_dataset(val_split, columns, task.prepare, cfg.batch_size)},
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


@dataclass(frozen=True)
class Split:
    """Part of a clip store: `files` (with `file_rows` of its rows in each, `rows` in all) and,
    when some files hold clips of both splits, the validation videos to keep or drop (`val_ids`,
    `keep`)."""

    files: tuple[str, ...]
    file_rows: tuple[int, ...]
    rows: int
    val_ids: Any = None  # pyarrow string array, or None: every row of `files`
    keep: bool = False  # keep (True) or drop (False) the rows of val_ids

    def read(self, columns: list[str], files: Any = None):
        """The split's rows of `files` (default: all of them) as one pyarrow Table."""
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        flt = None
        if self.val_ids is not None:
            flt = pc.field("video_id").isin(self.val_ids)
            flt = flt if self.keep else ~flt
        return pads.dataset(list(self.files if files is None else files), format="parquet").to_table(
            columns=columns, filter=flt)


def _split(ids, val_ids) -> tuple[Split, Split]:
    """(train, validation) Splits of a clip store. ids: video_id + __filename of every row. When
    no file holds clips of both sides (the clip store's layout: OUT/clips/<video_id>.parquet)
    each split reads only its own files; otherwise the files holding both are read by both
    splits, which filter their rows by video."""
    import pyarrow.compute as pc

    t = ids.append_column("val", pc.is_in(ids.column("video_id"), value_set=val_ids))
    per_side = t.group_by(["__filename", "val"]).aggregate([("video_id", "count")]).sort_by("__filename")
    mixed = per_side.group_by("__filename").aggregate([("val", "count")]).filter(pc.field("val_count") > 1).num_rows > 0

    def side(val: bool) -> Split:
        part = per_side.filter(pc.field("val") == val)
        counts = part.column("video_id_count").to_pylist()
        return Split(tuple(part.column("__filename").to_pylist()), tuple(counts), sum(counts),
                     val_ids if mixed else None, keep=val)

    return side(False), side(True)


def clip_dataset(split: Split, columns: list[str], prepare=None, rows_per_task: int = 32):
    """A Ray Dataset of a Split's clips, `prepare`d in Ray Data tasks (e.g. task.prepare; None:
    the rows as numpy batches). Each task reads a group of files holding about `rows_per_task`
    rows with pyarrow, then prepares them: a clip store holds one file per video, often of a few
    clips, and read_parquet's cost per file (measured ~10-20 ms on 2 cores, against ~0.7 ms for
    pyarrow) would otherwise set the pace of training. The groups are read in file order
    (`randomize_block_order` on them breaks `streaming_split` in Ray 2.58: the coordinator cannot
    register callbacks on blocks the driver owns); `torch_batches` shuffles rows."""
    import ray.data

    from pipelines.schema import numpy_batch

    groups: list[list[str]] = []
    rows = rows_per_task
    for f, n in zip(split.files, split.file_rows):
        if rows >= rows_per_task:
            groups.append([])
            rows = 0
        groups[-1].append(f)
        rows += n

    def read(batch: dict[str, Any]) -> dict[str, Any]:
        (files,) = batch["files"]
        out = numpy_batch(split.read(columns, list(files)))
        return out if prepare is None else prepare(out)

    items = [{"files": g} for g in groups]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        read, batch_size=1, batch_format="numpy")


def _parts(folder: str) -> list[str]:
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs
             if f.endswith(".parquet") and not f.startswith((".", "_"))]
    if not files:
        raise FileNotFoundError(f"no Parquet clips in {folder}")
    return files


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
