"""glibc's allocator and a serving replica's forward pass: one localization request (tiny preset,
1 torch thread) timed in this process and in Ray tasks of 0.25 CPU (what a model replica gets) and
1 CPU, each with glibc's defaults and with `jobs.allocator.keep_freed_memory`. Medians over 35
passes after 5 warm-up ones; prints one line per place, without / with, in ms.

    python benchmarks/allocator.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def forward_ms(checkpoint: str, data: bytes, keep: bool, n: int = 40) -> float:
    """Median ms of one request's Task.infer, after decoding it once (a fresh process each call)."""
    import torch

    from jobs.allocator import keep_freed_memory
    from jobs.tasks import load_checkpoint, served_config

    if keep:
        keep_freed_memory()
    torch.set_num_threads(1)
    task, cfg, settings = served_config(checkpoint)
    model, _ = load_checkpoint(checkpoint)
    options = {o.name: o.default for o in task.route.options}
    item, _ = task.from_upload(data, cfg, settings, options=options, max_pixels=1920 * 1080, max_seconds=60)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        task.infer(model, [item], torch.device("cpu"))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1000


def main() -> None:
    import multiprocessing as mp

    import ray

    from benchmarks.serve import CLIP_SETTINGS, tiny_checkpoints
    from pipelines.synth import make_scene, write_scene

    work = ROOT / "bench-out" / "allocator"
    work.mkdir(parents=True, exist_ok=True)
    gt = write_scene(make_scene(0, 0, seconds=2.0, size=128), work)
    data = (work / gt["video"]).read_bytes()
    ckpt = tiny_checkpoints(work, CLIP_SETTINGS, [gt["caption"]])["localization"]
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:  # a fresh process per measurement
        local = [pool.apply(forward_ms, (ckpt, data, keep)) for keep in (False, True)]
    print(f"a fresh process: {local[0]:.1f} ms without, {local[1]:.1f} ms with")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for cpus in (0.25, 1):
            task = ray.remote(num_cpus=cpus, max_calls=1)(forward_ms)  # max_calls=1: a fresh worker each
            without, with_ = (ray.get(task.remote(ckpt, data, keep)) for keep in (False, True))
            print(f"a Ray task of {cpus:g} CPU: {without:.1f} ms without, {with_:.1f} ms with")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
