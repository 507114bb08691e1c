"""GPU benchmark of the `paper` presets: samples/s, GPU utilisation and GPU memory with bf16 autocast.

Per task (--tasks), on the same clips and batch size, in the order a, c, b:

  (a) the training step alone: a few prepared batches (task.prepare, as tensors) put on the GPU
      once, then jobs.train.train_epoch over them in turn (bf16 autocast, AdamW): the most the
      model can take in, with no reading or preparing;
  (c) data alone: avray train's pipeline (jobs.data.clip_dataset, torch_batches with its shuffle)
      iterated here with no training: the most the data path delivers;
  (b) `avray train` (jobs.train.run) with 1 GPU worker on a local Ray with all the machine's CPUs:
      Ray Data reads and prepares the clips in its tasks and streams them to the worker
      (iter_torch_batches, the default shuffle), constant learning rate. Samples/s and the data-wait
      fraction come from RUN/metrics.jsonl over epochs 2..N (the first is a warm-up; validation and
      checkpoints are outside the epochs' training time).

GPU utilisation is NVML's (the share of time a kernel was running), sampled every 0.1 s in this
process; for (b) it is averaged over the training time of epochs 2..N (their `started_at` and
`epoch_seconds` in metrics.jsonl). GPU memory: for (a) torch's peak allocation, for (b) NVML's
peak of the device's used memory during the run, less what was used before it.

Data: clip Parquet (--data, e.g. `avray preprocess --size 224`, the paper presets' frame side),
tiled --copies times into WORK/data/clips, each copy with fresh video ids, so that an epoch has
enough batches: the GPU machine this was written for has no PyAV to decode media, so small clip
sets are made elsewhere and carried there. Without a GPU everything runs on the CPU (a check of
the script; no utilisation).

    python benchmarks/gpu.py --data /tmp/gpu/data/clips --json gpu.json
    python benchmarks/gpu.py --from-json gpu.json --write BENCHMARKS.md   # the table from a saved run

A run can be split by task when one sitting cannot hold all three (a GPU lent 10 minutes a call, say):
`--tasks separation --copies 100 --json sep.json`, and so on; `--from-json loc.json sep.json
cap.json` then makes one table of them (they must come from the same device, torch and Ray).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402
from benchmarks.train import fitted, numpy_batches, steady, train_columns, train_split, val_ids  # noqa: E402

BATCH = {"localization": 128, "separation": 16, "captioning": 64}  # per task; --batch-sizes overrides


def tile_clips(src: Path, work: Path, copies: int) -> Path:
    """WORK/data/clips: every clip file of `src`, `copies` times, each copy's video_id the first 16
    hex digits of sha1(old id + copy number) and its clip_id `<video_id>-<clip_index:05d>`, as
    `avray preprocess` names them; src's ../_config.json beside it. Reused when made from the same
    source and copies."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = work / "data"
    stamp = data / "tiled.json"
    settings = {"src": str(src.resolve()), "copies": copies}
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return data / "clips"
    shutil.rmtree(data, ignore_errors=True)
    (data / "clips").mkdir(parents=True)
    from jobs.data import clip_files
    for f in sorted(clip_files(str(src))):  # raises FileNotFoundError when there are none
        t = pq.read_table(f)
        vi, ci = t.schema.get_field_index("video_id"), t.schema.get_field_index("clip_id")
        for k in range(copies):
            vids = [hashlib.sha1(f"{v}-{k}".encode()).hexdigest()[:16] for v in t.column("video_id").to_pylist()]
            clip_ids = [f"{v}-{i:05d}" for v, i in zip(vids, t.column("clip_index").to_pylist())]
            out = t.set_column(vi, t.schema.field(vi), pa.array(vids, pa.string()))
            out = out.set_column(ci, t.schema.field(ci), pa.array(clip_ids, pa.string()))
            pq.write_table(out, data / "clips" / f"{vids[0]}.parquet")
    if (src.parent / "_config.json").exists():
        shutil.copy(src.parent / "_config.json", data / "_config.json")
    stamp.write_text(json.dumps(settings))
    return data / "clips"


class GpuSampler:
    """NVML utilisation (%) and used memory (bytes) of GPU 0 every `period` s in a thread, with
    Unix timestamps; `available` is False without NVML or a GPU (then nothing is sampled)."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
            self.available = True
        except Exception:  # no nvidia-ml-py, no driver or no GPU
            self.available = False

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.samples.append((time.time(), util, used))
            self._stop.wait(self.period)

    def used_now(self) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used if self.available else 0

    def utilisation(self, windows: list[tuple[float, float]]) -> float | None:
        """Mean utilisation (%) of the samples inside any of the (start, end) windows."""
        vals = [u for t, u, _ in self.samples if any(a <= t <= b for a, b in windows)]
        return statistics.mean(vals) if vals else None

    def peak_used(self) -> int | None:
        return max(m for _, _, m in self.samples) if self.samples else None


def step_only(task, mcfg, clips: Path, columns: list[str], held_out, batch_size: int, steps: int,
              device, n_batches: int = 4) -> dict:
    """(a): `n_batches` prepared batches on `device`, then jobs.train.train_epoch over them in turn:
    a warm-up pass of `n_batches` steps, then `steps` timed steps under the GPU sampler."""
    import itertools

    import torch

    from jobs.tasks.base import as_tensors
    from jobs.train import train_epoch

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    staged = [{k: v.to(device) for k, v in as_tensors(task.prepare(b, mcfg)).items()}
              for b in itertools.islice(numpy_batches(clips, columns, held_out, batch_size), n_batches)]
    model = task.model(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    amp = device.type == "cuda"
    train_epoch(model, opt, staged, task, mcfg, gen, device, amp)  # warm-up: kernels chosen, memory pooled
    if amp:
        torch.cuda.reset_peak_memory_stats()
    with GpuSampler() as gpu:
        stats = train_epoch(model, opt, itertools.islice(itertools.cycle(staged), steps), task, mcfg, gen,
                            device, amp)
    window = [(stats["started_at"], stats["started_at"] + stats["epoch_seconds"])]
    return {"samples_per_s": stats["samples_per_s"], "steps": stats["steps"], "seconds": stats["epoch_seconds"],
            "gpu_util": gpu.utilisation(window),
            "gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if amp else None,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def data_only(task, mcfg, clips: Path, columns: list[str], held_out, batch_size: int, epochs: int) -> dict:
    """(c): the training clips of avray train's pipeline (jobs.data.clip_dataset: read and
    task.prepare in Ray Data tasks; torch_batches with its shuffle) iterated on this process with
    no training, `epochs` times: clips/s of epochs 2..N pooled (the pipeline's ceiling)."""
    import functools

    import torch

    from jobs.data import clip_dataset, torch_batches

    ds = clip_dataset(train_split(clips, held_out), columns, functools.partial(task.prepare, cfg=mcfg), batch_size)
    gen = torch.Generator().manual_seed(0)
    rows, secs = [], []
    for _ in range(epochs):
        t0, n = time.perf_counter(), 0
        for b in torch_batches(ds, batch_size, train=True, shuffle=True, gen=gen):
            n += len(next(iter(b.values())))
        rows.append(n)
        secs.append(time.perf_counter() - t0)
    return {"samples_per_s": sum(rows[1:] or rows) / sum(secs[1:] or secs), "epoch_seconds": secs}


def avray_train(name: str, clips: Path, out: Path, batch_size: int, epochs: int, use_gpu: bool) -> dict:
    """(b): jobs.train.run with 1 worker and the paper preset, under the GPU sampler."""
    from jobs.train import TrainConfig, run

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(task=name, data=str(clips), out=str(out), preset="paper", epochs=epochs,
                      batch_size=batch_size, num_workers=1, use_gpu="yes" if use_gpu else "no",
                      lr=1e-4, lr_schedule="constant")
    with GpuSampler() as gpu:
        before = gpu.used_now()
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
    hist = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = hist[1:] or hist
    peak = gpu.peak_used()
    return {**steady(hist), "wall_s": wall, "epochs": len(hist),
            "gpu_util": gpu.utilisation([(r["started_at"], r["started_at"] + r["epoch_seconds"]) for r in rows]),
            "gpu_mem_gib": None if peak is None else (peak - before) / 2**30}


def table(res: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.0f} %"

    def gib(x):
        return "n/a" if x is None else f"{x:.1f}"

    lines = [
        f"Device: {res['device']}; torch {res['torch']}, Ray {res['ray']}; {res['cpus']} CPUs. Data: "
        f"{res['source_clips']} clips of {res['clip_px']} px ({res['clip_source']}) tiled with fresh video ids "
        f"(clips: copies x source clips; held out: the videos avray train keeps for validation, about a "
        f"tenth). bf16 autocast, AdamW, preset `paper`, 1 worker.",
        "",
        "| task | clips / videos held out | params (M) | batch | step alone: samples/s | GPU util | GPU mem GiB | data alone: samples/s | "
        "avray train: samples/s | ÷ step alone | data wait | GPU util | GPU mem GiB | steps/epoch | epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["results"].items():
        a, b = r["step"], r["avray"]
        lines.append(
            f"| {name} | {r['clips']} / {r['held_out_videos']} | {a['params_m']:.1f} | {r['batch_size']} | {a['samples_per_s']:.0f} | "
            f"{pct(a['gpu_util'])} | {gib(a['gpu_mem_gib'])} | {r['data']['samples_per_s']:.0f} | "
            f"{b['samples_per_s']:.0f} | **{b['samples_per_s'] / a['samples_per_s']:.2f}** | "
            f"{b['data_wait_fraction']:.1%} | {pct(b['gpu_util'])} | {gib(b['gpu_mem_gib'])} | {b['steps']:.0f} | "
            f"{r['epochs']} |")
    lines += [
        "",
        "Step alone: prepared batches already on the GPU, the step code of `avray train` "
        "(jobs.train.train_epoch) timed over "
        f"{res['step_steps']} steps after a warm-up. Data alone: avray train's pipeline (Ray Data reading and "
        f"preparing the clips, the worker's shuffle) iterated on the driver with no training, epochs 2..N. avray train: `jobs.train.run`, the epochs of the table, "
        "figures pooled over epochs 2..N (training time only). GPU util: NVML's busy share sampled every 0.1 s "
        "over those intervals. GPU mem: torch's peak allocation (step alone), NVML's peak used memory "
        "less that before the run (avray train, the whole process: CUDA context and caching allocator too).",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="clip Parquet folder to tile (OUT/clips of avray preprocess)")
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "gpu"), help="tiled data and runs")
    ap.add_argument("--copies", type=int, default=300, help="copies of each clip file (default: 300)")
    ap.add_argument("--tasks", nargs="+", default=list(BATCH), choices=list(BATCH))
    ap.add_argument("--batch-sizes", nargs="+", type=int, help=f"one per task (default: {BATCH})")
    ap.add_argument("--epochs", type=int, default=3, help="avray train epochs; the first is a warm-up (default: 3)")
    ap.add_argument("--step-steps", type=int, default=40, help="timed steps of the step-alone loop (default: 40)")
    ap.add_argument("--clip-source", default="avray synth scenes, avray preprocess --fps 8",
                    help="how the --data clips were made, for the table")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--from-json", nargs="+", metavar="JSON",
                    help="skip the runs: print (and --write) the table of saved --json files, one or one per task")
    ap.add_argument("--write", help="replace the gpu section of this Markdown file (BENCHMARKS.md)")
    args = ap.parse_args()

    if args.from_json:
        res = merge([json.loads(Path(f).read_text()) for f in args.from_json])
    else:
        if not args.data:
            ap.error("--data is required (unless --from-json)")
        res = measure(args)
    md = table(res)
    print(md)
    if args.write:
        write_section(Path(args.write), "gpu", md)


SETTING = ("device", "torch", "ray", "cpus", "source_clips", "clip_px", "clip_source", "step_steps")


def merge(runs: list[dict]) -> dict:
    """One result of several saved runs (say one per task): their results together, later runs
    replacing a task measured twice. The runs must share SETTING (same machine, software, source
    clips and step count), else the table would mix them; SystemExit names what differs."""
    for key in SETTING:
        seen = {json.dumps(r[key]) for r in runs}
        if len(seen) > 1:
            raise SystemExit(f"--from-json: the runs differ in {key}: {sorted(seen)}")
    return {**{k: runs[0][k] for k in SETTING}, "results": {k: v for r in runs for k, v in r["results"].items()}}


def measure(args) -> dict:
    import pyarrow.parquet as pq
    import ray
    import torch

    from jobs.data import keep_idle_workers

    sizes = dict(zip(args.tasks, args.batch_sizes)) if args.batch_sizes else {t: BATCH[t] for t in args.tasks}
    if len(sizes) != len(args.tasks):
        raise SystemExit("--batch-sizes needs one size per task")
    work = Path(args.workdir)
    src = Path(args.data)
    t0 = time.perf_counter()
    clips = tile_clips(src, work, args.copies)
    print(f"tiled {src} x{args.copies} into {clips} in {time.perf_counter() - t0:.1f} s", flush=True)
    held_out = val_ids(clips)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    first = pq.read_table(sorted(clips.glob("*.parquet"))[0], columns=["frames_shape"]).column("frames_shape")[0]
    res = {"device": torch.cuda.get_device_name(0) if cuda else "CPU (no GPU)", "torch": torch.__version__,
           "ray": ray.__version__, "cpus": os.cpu_count(), "clip_source": args.clip_source,
           "source_clips": pq.read_table(str(src), columns=["video_id"]).num_rows, "clip_px": first.as_py()[1],
           "step_steps": args.step_steps, "results": {}}
    setting = {"copies": args.copies, "clips": pq.read_table(str(clips), columns=["video_id"]).num_rows,
               "held_out_videos": len(held_out), "epochs": args.epochs}

    keep_idle_workers()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        for name in args.tasks:
            bs = sizes[name]
            task, mcfg = fitted(name, clips, held_out, "paper")
            columns = train_columns(clips, task)
            step = step_only(task, mcfg, clips, columns, held_out, bs, args.step_steps, device)
            if cuda:
                torch.cuda.empty_cache()  # the step-alone model's memory, before the Ray worker takes the GPU
            print(f"{name}: step alone {step['samples_per_s']:.0f} samples/s, GPU util {step['gpu_util']}", flush=True)
            data = data_only(task, mcfg, clips, columns, held_out, bs, args.epochs)
            print(f"{name}: data alone {data['samples_per_s']:.0f} samples/s", flush=True)
            avray = avray_train(name, clips, work / "runs" / name, bs, args.epochs, cuda)
            print(f"{name}: avray train {avray['samples_per_s']:.0f} samples/s, wait {avray['data_wait_fraction']:.1%}, "
                  f"GPU util {avray['gpu_util']}, run() {avray['wall_s']:.0f} s", flush=True)
            res["results"][name] = {"batch_size": bs, **setting, "step": step, "data": data, "avray": avray}
            if args.json:  # after every task, so a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(res, indent=2))
    finally:
        ray.shutdown()
    return res


if __name__ == "__main__":
    main()
