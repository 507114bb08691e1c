"""Serving benchmark: requests/s and p50/p99 latency of each route over loopback HTTP against the
same decode + model called directly in a loop, with and without @serve.batch.

One run, bounded in count and time. Models: freshly initialised `tiny` checkpoints (speed does
not depend on training) with the clip settings `make demo` trains on (2 s clips, 8 fps, 96 px,
16 kHz); input: one synthetic scene of 2 s (one clip) at 128 px, the same bytes for every request.

  direct: in this process, torch on one thread (as a Serve replica with < 1 CPU gets), a loop of
          `Task.from_upload` + `Task.infer([item])`: the work of one request without Serve;
  serve:  `avray serve`'s application (jobs.serve.application) on a local Ray with 2 CPUs, one
          replica per deployment (autoscaling off, so batched and unbatched compare like for like),
          uploads decoded in the ingress (avray serve's default), and at c = 1 also in a Decoder
          deployment (decode_in "decoder", the cluster topology: one hop more),
          queues large enough that no request is refused; an asyncio + aiohttp client keeps
          `c` requests in flight (c = 1, 8, 32) until --requests have completed or --seconds
          have passed (after 4 warm-up requests).

Serving overhead = p50 latency (serve, c = 1) - p50 latency (direct). Batching gain = requests/s
batched / unbatched at c = 32. Results are printed as Markdown and, with --write BENCHMARKS.md,
replace the section between the serve markers there.

    python benchmarks/serve.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402
from jobs.serve import serve_env  # noqa: E402  (light: no Ray or torch at import)
from jobs.tasks import TASKS  # noqa: E402

CLIP_SETTINGS = {"clip_seconds": 2.0, "fps": 8.0, "size": 96, "sample_rate": 16000, "n_fft": 512,
                 "win_length": 400, "hop_length": 160, "n_mels": 64, "resize": "crop", "hop_seconds": None}


def tiny_checkpoints(out: Path, clip_settings: dict[str, Any], captions: list[str]) -> dict[str, str]:
    """A freshly initialised `tiny` checkpoint per task (seed 0) carrying `clip_settings`, fitted
    on rows that hold only `captions` (the captioner's vocabulary). Returns task -> path."""
    import numpy as np
    import torch

    from jobs.tasks import get
    from models.checkpoint import save_checkpoint

    rows = {"video_id": np.array([f"{i:016x}" for i in range(len(captions))], object),
            "caption": np.array(captions, object)}
    torch.manual_seed(0)
    paths = {}
    for name in TASKS:
        task = get(name)
        cfg = task.fit(task.presets["tiny"], lambda cols: {c: rows[c] for c in cols if c in rows})
        paths[name] = str(save_checkpoint(out / f"{name}.pt", name, task.model(cfg), cfg,
                                          extra={"epoch": 0, "clip_settings": clip_settings}))
    return paths


def routes() -> dict[str, str]:
    """Route name (the last part of its path) -> task."""
    from jobs.tasks import get

    return {get(t).route.path.rsplit("/", 1)[1]: t for t in TASKS}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def direct(route: str, path: str, data: bytes, n: int, seconds: float) -> dict[str, float]:
    """Latency of decode + model for one request, in a loop in this process (glibc's allocator set
    as in the serving replicas: jobs.allocator.keep_freed_memory)."""
    import torch

    from jobs.allocator import keep_freed_memory

    keep_freed_memory()
    from jobs.serve_app import AppArgs
    from jobs.tasks import load_checkpoint, served_config

    task, cfg, settings = served_config(path, task=routes()[route])
    model, _ = load_checkpoint(path)
    device = torch.device("cpu")
    options = {o.name: o.default for o in task.route.options}

    def prepare() -> dict[str, Any]:
        return task.from_upload(data, cfg, settings, max_pixels=AppArgs.max_pixels, max_seconds=AppArgs.max_seconds,
                                options=options)[0]

    def one() -> None:
        task.infer(model, [prepare()], device)

    # the ceiling of what @serve.batch can gain: the model alone on 16 requests, batched vs one by one
    item = prepare()
    singles, batched = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(16):
            task.infer(model, [item], device)
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        task.infer(model, [item] * 16, device)
        batched.append(time.perf_counter() - t0)
    model_gain = statistics.median(singles) / statistics.median(batched)

    for _ in range(3):
        one()
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(lat) < n and time.perf_counter() < t_end:
        t0 = time.perf_counter()
        one()
        lat.append(time.perf_counter() - t0)
    return {"rps": len(lat) / sum(lat), "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "n": len(lat),
            "model_gain": model_gain}


async def _load(url: str, data: bytes, c: int, n: int, seconds: float) -> dict[str, float]:
    import aiohttp

    lat: list[float] = []
    timings: list[dict[str, float]] = []
    codes: dict[int, int] = {}
    stop = time.perf_counter() + seconds

    async def one(session) -> None:
        form = aiohttp.FormData()
        form.add_field("file", data, filename="scene.mp4", content_type="video/mp4")
        t0 = time.perf_counter()
        async with session.post(url, data=form) as r:
            await r.read()
            codes[r.status] = codes.get(r.status, 0) + 1
        if r.status == 200:
            lat.append(time.perf_counter() - t0)
            timings.append(server_timing(r.headers["Server-Timing"]))

    async def worker(session, budget: list[int]) -> None:
        while budget[0] > 0 and time.perf_counter() < stop:
            budget[0] -= 1
            await one(session)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for _ in range(4):  # warm-up
            await one(session)
        lat.clear()
        timings.clear()
        codes.clear()
        budget = [n]
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session, budget) for _ in range(c)))
        wall = time.perf_counter() - t0
    if codes.get(200, 0) != sum(codes.values()):
        raise RuntimeError(f"non-200 answers during the benchmark: {codes}")
    parts = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
    return {"rps": len(lat) / wall, "p50": _pct(lat, 0.5), "p99": _pct(lat, 0.99), "n": len(lat), "parts": parts}


def server_timing(header: str) -> dict[str, float]:
    """'decoder;dur=12.5, ..., batch;desc="3"' -> {"decoder": 12.5, ..., "batch": 3.0} (ms; batch: requests)."""
    out = {}
    for part in header.split(","):
        name, _, value = part.strip().partition(";")
        out[name] = float(value.split("=", 1)[1].strip('"'))
    return out


def run_serve(ckpts: dict[str, str], data: bytes, routes: list[str], conc: list[int], batching: bool,
              port: int, n: int, seconds: float, decode_in: str = "ingress") -> dict[tuple[str, int], dict[str, float]]:
    from ray import serve

    from jobs.serve import application
    from jobs.tasks import get

    deployments = [{"name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 256, "max_queued_requests": -1,
                    "ray_actor_options": {"num_cpus": 0.1}},
                   {"name": "Decoder", "num_replicas": 1, "max_ongoing_requests": 8, "max_queued_requests": -1,
                    "ray_actor_options": {"num_cpus": 0.5}}]
    deployments += [{"name": name, "num_replicas": 1, "max_ongoing_requests": 64, "max_queued_requests": -1,
                     "ray_actor_options": {"num_cpus": 0.25}} for name in (get(t).deployment for t in TASKS)]
    args = {**ckpts, "batching": batching, "max_batch_size": 16, "decode_in": decode_in}
    serve.run(application(args, deployments), name="bench", route_prefix="/")
    out = {}
    for route in routes:
        for c in conc:
            out[(route, c)] = asyncio.run(_load(f"http://127.0.0.1:{port}/v1/{route}", data, c, max(n, 2 * c), seconds))
            r = out[(route, c)]
            print(f"  serve {'batched' if batching else 'unbatched'} decode in {decode_in} {route} c={c}: {r['rps']:.1f} req/s, "
                  f"p50 {r['p50'] * 1000:.1f} ms, p99 {r['p99'] * 1000:.1f} ms ({r['n']} requests)", flush=True)
    serve.delete("bench")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "serve"), help="checkpoints and media")
    ap.add_argument("--routes", nargs="+", default=list(routes()), choices=list(routes()))
    ap.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=64, help="requests per measurement, at least 2 x concurrency")
    ap.add_argument("--seconds", type=float, default=20.0, help="time bound per measurement")
    ap.add_argument("--port", type=int, default=8471)
    ap.add_argument("--write", type=Path, help="update this Markdown file's serve section")
    a = ap.parse_args()

    serve_env()  # avray serve's Serve mode, before Ray starts
    import ray
    import torch
    from ray import serve

    from pipelines.synth import make_scene, write_scene

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    gt = write_scene(make_scene(0, 0, seconds=2.0, size=128), work)
    scene = work / gt["video"]
    data = scene.read_bytes()
    ckpts = tiny_checkpoints(work, CLIP_SETTINGS, [gt["caption"], "a red circle on the left hums"])

    torch.set_num_threads(1)
    base = {}
    for route in a.routes:
        base[route] = direct(route, ckpts[routes()[route]], data, a.requests, a.seconds)
        print(f"  direct {route}: {base[route]['rps']:.1f} req/s, p50 {base[route]['p50'] * 1000:.1f} ms", flush=True)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": a.port, "request_timeout_s": 120})
        batched = run_serve(ckpts, data, a.routes, a.concurrency, True, a.port, a.requests, a.seconds)
        unbatched = run_serve(ckpts, data, a.routes, a.concurrency, False, a.port, a.requests, a.seconds)
        # the cluster topology: decode in a Decoder deployment (one hop more), at c = 1
        hop = run_serve(ckpts, data, a.routes, [1], True, a.port, a.requests, a.seconds, decode_in="decoder")
        serve.shutdown()
    finally:
        ray.shutdown()

    cmax = max(a.concurrency)
    lines = [f"Input: one {len(data) / 1024:.0f} KB synthetic scene of 2 s (128 px, H.264 + AAC) per request; "
             f"tiny models, clips of 2 s at 8 fps, 96 px; up to {a.requests} requests or {a.seconds:g} s per "
             f"measurement after 4 warm-up requests; 2 cores, Ray with 2 CPUs, client on the same machine.", "",
             "| route | mode | concurrency | requests/s | p50 ms | p99 ms |", "|---|---|---|---|---|---|"]
    for route in a.routes:
        b = base[route]
        lines.append(f"| {route} | direct loop (decode + model) | 1 | {b['rps']:.1f} | {b['p50'] * 1000:.1f} | {b['p99'] * 1000:.1f} |")
        for mode, res in (("serve, @serve.batch", batched), ("serve, unbatched", unbatched),
                          ("serve, @serve.batch, decode in a Decoder deployment", hop)):
            for c in sorted(c for r_, c in res if r_ == route):
                r = res[(route, c)]
                lines.append(f"| {route} | {mode} | {c} | {r['rps']:.1f} | {r['p50'] * 1000:.1f} | {r['p99'] * 1000:.1f} |")
    lines += ["", f"| route | serving overhead, p50 at c = 1 (target ≤ 10 ms) | … with a Decoder deployment | batched / unbatched requests/s at c = {cmax} (target ≥ 2) | the model alone: 16 requests batched / one by one | serve batched c = {cmax} / direct requests/s |",
              "|---|---|---|---|---|---|"]
    for route in a.routes:
        over = (batched[(route, 1)]["p50"] - base[route]["p50"]) * 1000 if 1 in a.concurrency else float("nan")
        over_hop = (hop[(route, 1)]["p50"] - base[route]["p50"]) * 1000
        gain = batched[(route, cmax)]["rps"] / unbatched[(route, cmax)]["rps"]
        lines.append(f"| {route} | {over:+.1f} ms | {over_hop:+.1f} ms | **{gain:.2f}x** | {base[route]['model_gain']:.2f}x | "
                     f"{batched[(route, cmax)]['rps'] / base[route]['rps']:.2f}x |")
    if 1 in a.concurrency:
        lines += ["", "Where a request's time goes, serve with @serve.batch at c = 1 (medians over the requests, ms, from the "
                      "`Server-Timing` header the service sends; HTTP + ingress = client latency − decoder round trip; "
                      f"last column: median requests per forward pass at c = {cmax}):", "",
                  "| route | decode in | client p50 | HTTP + ingress | decoder hop | decode | model hop | forward pass | "
                  f"requests per batch, c = {cmax} |", "|---|---|---|---|---|---|---|---|---|"]
        for route in a.routes:
            for where, res in (("the ingress", batched), ("a Decoder deployment", hop)):
                r, t = res[(route, 1)], res[(route, 1)]["parts"]
                lines.append(f"| {route} | {where} | {r['p50'] * 1000:.1f} | {r['p50'] * 1000 - t['decoder']:.1f} | "
                             f"{t['decoder'] - t['decode'] - t['model']:.1f} | {t['decode']:.1f} | "
                             f"{t['model'] - t['inference']:.1f} | {t['inference']:.1f} | "
                             + (f"{batched[(route, cmax)]['parts']['batch']:g} |" if res is batched else "– |"))
    md = "\n".join(lines)
    print(md)
    if a.write:
        write_section(a.write, "serve", md)
        print(f"wrote the serve section of {a.write}")


if __name__ == "__main__":
    main()
