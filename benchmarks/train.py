"""Training benchmark: `avray train` with 1 worker against a plain PyTorch loop, same data.

One run measures, per task (--tasks), on the same clips (synthetic scenes made once under
bench-out/train/: `avray synth` then `avray preprocess` at 96 px, 8 fps), the same preset,
batch size, number of epochs and training split (jobs.data.validation_videos):

  (a) a plain loop in this process: pyarrow.dataset streams the clip Parquet (only the
      task's columns, the validation videos filtered out), re-batched to --batch-size rows
      and turned into the dict of numpy arrays Ray Data's `map_batches` gets, then the loop
      of jobs.train.train_loop_per_worker: task.prepare (in the training thread), tensors,
      task.step, AdamW, drop_last, with the same torch thread count as the Ray Train worker;
  (b) `avray train` (jobs.train.run, --num-workers 1, no GPU, constant learning rate like
      the plain loop, its default shuffling of batches) on a local Ray started with 2 CPUs
      before the clock starts: Ray Data reads and runs task.prepare in its tasks, the worker
      steps; samples/s and the data-wait fraction come from RUN/metrics.jsonl, measured
      inside the worker over the training pass only (validation and checkpointing excluded);
      the wall time of the whole run() call is reported too.
The first batch of both is checked to be identical (keys, dtypes, shapes, values).

"Data wait" is the time spent in `next()` on the batch iterator (reading, filtering and
preparing, or waiting for Ray Data's prefetch), as a fraction of the epoch's training time. The first epoch is a warm-up; steady-state figures pool epochs 2..N. Each
figure is the median of --runs runs (plain and Ray interleaved). Results are printed as
Markdown and, with --write BENCHMARKS.md, replace the section between the train markers there.

    python benchmarks/train.py --runs 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402
from jobs.tasks import TASKS  # noqa: E402


def make_data(work: Path, videos: int, seconds: float, size: int, fps: float) -> Path:
    """bench-out/train/data/clips: `avray synth` scenes preprocessed at `size` px, `fps`;
    reused when a previous run made it with the same settings."""
    from jobs.cli import main as cli
    from jobs.preprocess import PreprocessConfig, run

    media, data = work / "media", work / "data"
    settings = {"videos": videos, "seconds": seconds, "size": size, "fps": fps}
    stamp = work / "data-settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings and (data / "clips").is_dir():
        return data / "clips"
    shutil.rmtree(media, ignore_errors=True)
    shutil.rmtree(data, ignore_errors=True)
    cli(["synth", "--out", str(media), "--videos", str(videos), "--seconds", str(seconds),
         "--size", str(size), "--seed", "0"])
    run(PreprocessConfig(inputs=(str(media / "manifest.jsonl"),), out=str(data), size=size, fps=fps,
                         num_cpus=2))
    stamp.write_text(json.dumps(settings))
    return data / "clips"


def train_columns(clips: Path, task) -> list[str]:
    """The task's columns that the clip files hold (what jobs.train.run asks Ray Data for)."""
    import pyarrow.parquet as pq
    from jobs.data import clip_files
    present = set(pq.read_schema(sorted(clip_files(str(clips)))[0]).names)
    return [c for c in task.columns if c in present]


def val_ids(clips: Path, fraction: float = 0.1):
    """The held-out video ids, as jobs.train.run computes them (val_fraction default 0.1)."""
    import pyarrow.parquet as pq
    from jobs.data import validation_videos
    return validation_videos(pq.read_table(str(clips), columns=["video_id"]).column("video_id"), fraction)


def train_split(clips: Path, held_out):
    """avray train's training Split of the clip folder (jobs.data.split_store) without `held_out` videos."""
    import pyarrow.dataset as pads
    from jobs.data import split_store
    ids = pads.dataset(str(clips), format="parquet").to_table(columns=["video_id", "__filename"])
    return split_store(ids, held_out)[0]


def numpy_batches(clips: Path, columns: list[str], held_out, batch_size: int) -> Iterator[dict[str, Any]]:
    """Training clips as numpy batches of `batch_size` rows (the last partial one dropped), streamed
    file by file: the plain equivalent of read_parquet(columns) -> filter(not validation) ->
    iter_batches(numpy)."""
    import pyarrow.compute as pc

    from jobs import data

    return data.numpy_batches(str(clips), columns, batch_size, filter=~pc.field("video_id").isin(held_out),
                              drop_last=True)


def fitted(name: str, clips: Path, held_out, preset: str):
    """(task, model config) as jobs.train.run makes them: the preset, fitted on the training split."""
    from jobs.tasks import get
    from jobs.train import TrainConfig, model_config
    from pipelines.schema import numpy_batch

    task = get(name)
    split = train_split(clips, held_out)
    present = set(train_columns(clips, task))
    mcfg = task.fit(model_config(TrainConfig(task=name, data=str(clips), out="-", preset=preset)),
                    lambda cols: numpy_batch(split.read([c for c in cols if c in present])))
    return task, mcfg


def check_same_batch(clips: Path, task, mcfg, columns: list[str], held_out, batch_size: int) -> str:
    """The first training batch of avray train's pipeline (jobs.data.clip_dataset: the training
    files read and `task.prepare`d in Ray Data tasks, `iter_torch_batches`; in order for the
    check) against the plain loop's first batch (`numpy_batches`, `task.prepare`, `as_tensors`):
    same keys, dtypes, shapes and values. Raises AssertionError otherwise."""
    import functools

    import ray.data
    import torch

    from jobs.data import clip_dataset
    from jobs.tasks.base import as_tensors

    ctx = ray.data.DataContext.get_current()
    order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        prepare = functools.partial(task.prepare, cfg=mcfg)
        ray_out = next(iter(clip_dataset(train_split(clips, held_out), columns, prepare, batch_size).iter_torch_batches(
            batch_size=batch_size, drop_last=True)))
    finally:
        ctx.execution_options.preserve_order = order
    mine = as_tensors(task.prepare(next(numpy_batches(clips, columns, held_out, batch_size)), mcfg))
    assert list(mine) == list(ray_out), (list(mine), list(ray_out))
    for k, v in ray_out.items():
        assert mine[k].dtype == v.dtype and mine[k].shape == v.shape and torch.equal(mine[k], v), k
    return "first batch identical: " + ", ".join(f"{k} {v.dtype} {tuple(v.shape)}".replace("torch.", "")
                                                 for k, v in ray_out.items())


def plain_train(task, mcfg, clips: Path, columns: list[str], held_out, batch_size: int, epochs: int,
                threads: int, seed: int = 0, lr: float = 1e-3, weight_decay: float = 1e-4) -> list[dict]:
    """(a) jobs.train.train_epoch, the step code of every Ray Train worker, without Ray: one dict
    per epoch with the fields the worker writes to metrics.jsonl (samples_per_s, data_wait_fraction, ...)."""
    import torch

    from jobs.tasks.base import as_tensors
    from jobs.train import train_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cpu")
    model = task.model(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def batches():
        for b in numpy_batches(clips, columns, held_out, batch_size):
            yield as_tensors(task.prepare(b, mcfg))

    history = []
    for epoch in range(epochs):
        stats = train_epoch(model, opt, batches(), task, mcfg, gen, device, amp=False)
        history.append({"epoch": epoch, **stats})
    return history


def ray_train(task: str, clips: Path, out: Path, preset: str, batch_size: int, epochs: int,
              torch_threads: int) -> tuple[list[dict], float]:
    """(b) jobs.train.run with 1 worker, no GPU, on the running Ray: (metrics.jsonl rows, wall s)."""
    from jobs.train import TrainConfig, run

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(task=task, data=str(clips), out=str(out), preset=preset, epochs=epochs,
                      batch_size=batch_size, num_workers=1, use_gpu="no", lr_schedule="constant",
                      torch_threads=torch_threads)
    t0 = time.perf_counter()
    run(cfg)
    wall = time.perf_counter() - t0
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f], wall


def _thread_probe(config: dict) -> None:
    import torch
    with open(config["path"], "w") as f:
        json.dump({"torch_threads": torch.get_num_threads(),
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset")}, f)


def ray_worker_threads(storage: Path) -> dict:
    """torch.get_num_threads() and OMP_NUM_THREADS inside a Ray Train worker like avray train's
    (TorchTrainer, 1 worker, default 1 CPU per worker); the worker writes them to a file (local Ray)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    path = storage / "threads.json"
    TorchTrainer(_thread_probe, train_loop_config={"path": str(path)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False),
                 run_config=ray.train.RunConfig(name="threads", storage_path=str(storage))).fit()
    return json.loads(path.read_text())


def steady(history: list[dict]) -> dict[str, float]:
    """Pooled over epochs 2..N (all epochs if there is only one): samples/s, data-wait
    fraction, seconds per epoch, steps per epoch."""
    rows = history[1:] or history
    secs = sum(r["epoch_seconds"] for r in rows)
    samples = sum(r["samples_per_s"] * r["epoch_seconds"] for r in rows)
    wait = sum(r["data_wait_fraction"] * r["epoch_seconds"] for r in rows)
    return {"samples_per_s": samples / secs, "data_wait_fraction": wait / secs,
            "epoch_seconds": secs / len(rows), "steps": statistics.mean(r["steps"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "train"),
                    help="data and runs (default: bench-out/train/)")
    ap.add_argument("--tasks", nargs="+", default=["localization", "separation"],
                    choices=list(TASKS))
    ap.add_argument("--preset", default="tiny", help="model preset for every task (default: tiny)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run; the first is a warm-up (default: 2)")
    ap.add_argument("--runs", type=int, default=3, help="runs per task; medians are reported")
    ap.add_argument("--videos", type=int, default=480,
                    help="synthetic scenes (default: 480, ~25 steps per epoch at batch 32: Ray Data's start "
                         "of each epoch is a fixed cost, which a few steps would exaggerate)")
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per scene (clips of 2 s)")
    ap.add_argument("--size", type=int, default=96, help="scene and clip frame side in pixels")
    ap.add_argument("--fps", type=float, default=8.0, help="clip frames per second")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch threads on both sides (default 0: what a 1-CPU Ray Train worker gets)")
    ap.add_argument("--write", help="replace the train section of this Markdown file (BENCHMARKS.md)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import ray

    from jobs.data import keep_idle_workers

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    clips = make_data(work, args.videos, args.seconds, args.size, args.fps)
    held_out = val_ids(clips)

    keep_idle_workers()  # as avray train does when it starts Ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        threads = ray_worker_threads(work / "probe")
        print(f"Ray Train worker: torch threads {threads['torch_threads']}, "
              f"OMP_NUM_THREADS={threads['omp_num_threads']}", flush=True)
        n_threads = args.torch_threads or threads["torch_threads"]
        results: dict[str, dict] = {}
        for name in args.tasks:
            task, mcfg = fitted(name, clips, held_out, args.preset)
            columns = train_columns(clips, task)
            check = check_same_batch(clips, task, mcfg, columns, held_out, args.batch_size)
            print(f"{name}: same batch from Ray Data and pyarrow: {check}", flush=True)
            plain, avray, walls = [], [], {"plain": [], "avray": []}
            for r in range(args.runs):
                t0 = time.perf_counter()
                plain_hist = plain_train(task, mcfg, clips, columns, held_out, args.batch_size, args.epochs,
                                         n_threads)
                walls["plain"].append(time.perf_counter() - t0)
                plain.append(steady(plain_hist))
                hist, wall = ray_train(name, clips, work / "runs" / f"{name}-{r}", args.preset,
                                       args.batch_size, args.epochs, args.torch_threads)
                if {h["torch_threads"] for h in hist} != {n_threads}:
                    raise RuntimeError(f"avray train ran {hist[0]['torch_threads']} torch threads, not {n_threads}")
                walls["avray"].append(wall)
                if [h["steps"] for h in hist] != [h["steps"] for h in plain_hist]:
                    raise RuntimeError(f"steps per epoch differ: plain {[h['steps'] for h in plain_hist]}, "
                                       f"avray train {[h['steps'] for h in hist]}")
                avray.append(steady(hist))
                print(f"{name} run {r + 1}/{args.runs}: plain {plain[-1]['samples_per_s']:.1f} samples/s "
                      f"(wait {plain[-1]['data_wait_fraction']:.1%}), avray train {avray[-1]['samples_per_s']:.1f} "
                      f"samples/s (wait {avray[-1]['data_wait_fraction']:.1%}), run() {wall:.1f} s", flush=True)
            med = {side: {k: statistics.median(x[k] for x in rows) for k in rows[0]}
                   for side, rows in (("plain", plain), ("avray", avray))}
            overheads = [1 - a["samples_per_s"] / p["samples_per_s"] for p, a in zip(plain, avray)]
            results[name] = {**med, "overhead": statistics.median(overheads), "overheads": overheads,
                             "wall_s": {k: statistics.median(v) for k, v in walls.items()}, "check": check}
    finally:
        ray.shutdown()

    n_clips = pq.read_table(str(clips), columns=["video_id"]).num_rows
    res = {"results": results, "torch_threads": threads, "threads_used": n_threads, "runs": args.runs, "epochs": args.epochs,
           "batch_size": args.batch_size, "preset": args.preset, "clips": n_clips,
           "held_out_videos": len(held_out), "cpus": os.cpu_count()}
    (work / "train.json").write_text(json.dumps(res, indent=2))

    lines = [
        f"Data: {args.videos} synthetic scenes of {args.seconds:g} s ({n_clips} clips of 2 s at {args.fps:g} fps, "
        f"{args.size} px; {len(held_out)} videos held out for validation, as `avray train` splits them); "
        f"preset `{args.preset}`, batch {args.batch_size}, {args.epochs} epochs of which the first is a warm-up; "
        f"medians of {args.runs} runs; {os.cpu_count()} cores, Ray started with 2 CPUs.",
        "",
        "| task | steps/epoch | plain loop samples/s | avray train samples/s | overhead | data wait, plain | "
        "data wait, avray train | wall s: plain loop / `run()` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p, a = r["plain"], r["avray"]
        lines.append(f"| {name} | {a['steps']:.0f} | {p['samples_per_s']:.1f} | {a['samples_per_s']:.1f} | "
                     f"**{r['overhead']:+.1%}** | {p['data_wait_fraction']:.1%} | {a['data_wait_fraction']:.1%} | "
                     f"{r['wall_s']['plain']:.1f} / {r['wall_s']['avray']:.1f} |")
    lines += [
        "",
        f"Overhead = 1 − (avray train samples/s) / (plain samples/s), per run, then the median; target ≤ 10 %. "
        f"Torch threads: {n_threads} on both sides (a Ray Train worker with 1 CPU gets "
        f"OMP_NUM_THREADS={threads['omp_num_threads']} and torch.get_num_threads() = {threads['torch_threads']}, "
        f"measured; the plain loop calls torch.set_num_threads({n_threads})"
        + (f", avray train gets --torch-threads {n_threads}" if args.torch_threads else "") + "). "
        "The plain loop reads and prepares (task.prepare) in its training thread; avray train reads and "
        "prepares in Ray Data tasks on the other CPU (map_batches) and the worker only turns the prepared "
        "arrays into tensors (iter_torch_batches, prefetch_batches=2) and draws each batch from a buffer of "
        "8 batches' clips (its default `--shuffle`, jobs.data.shuffled_batches; the plain loop keeps file "
        "order). A local Ray keeps max(4, 2 x CPUs) idle workers (4 here), as `avray train` sets it up "
        "(jobs.data.keep_idle_workers). "
        "Wall s of `run()` include starting the worker, validation and a checkpoint every epoch.",
    ]
    md = "\n".join(lines)
    print(md)
    if args.write:
        write_section(Path(args.write), "train", md)


if __name__ == "__main__":
    main()
