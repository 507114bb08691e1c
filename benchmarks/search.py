"""Embedding and search benchmark: `avray embed` against the model's forward pass alone, and search
latency exact vs approximate on 10^4, 10^5, 10^6 vectors with the approximate index's recall@10.

(a) embed: synthetic scenes (`avray synth`, `avray preprocess` at the tiny preset's frame size, 8 fps,
    2 s clips, made once under bench-out/search/) embedded by `avray embed` on a local 2-CPU Ray (one model actor
    per CPU, 1 torch thread each), timed from the command's start with Ray already running;
    against the same tiny model's forward pass alone (encode_video + encode_audio) on the same
    clips, prepared in memory beforehand, in this process with 2 torch threads (both cores) and
    glibc's allocator set as in the actors (jobs.allocator.keep_freed_memory).
    Ratio = embed clips/s / forward clips/s (target >= 0.8). Median of --runs.
(b) search: N unit vectors (D = 64, the tiny preset's) in --clusters clusters (a random centre
    each, plus Gaussian noise of --spread, normalised: embeddings of a dataset cluster by content;
    uniform random vectors are the worst case for any index and are not what a model gives).
    Queries: --queries vectors drawn like the data. Exact: pipelines.embedstore.top_k (one
    matrix product per query over the vectors); approximate: jobs.index.build_index, both kinds
    (HNSW and IVF, `avray index`'s defaults). p50 / p99 ms per single query, speed-up, recall@10
    against exact.

    python benchmarks/search.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402
from jobs.index import IndexConfig  # noqa: E402
from models.retrieval import PRESETS  # noqa: E402

SIZE, DIM = PRESETS["tiny"].image_size, PRESETS["tiny"].embed_dim  # the tiny preset's frame side and dimension


def make_clips(work: Path, videos: int, seconds: float) -> Path:
    """bench-out/search/data-<videos>x<seconds>s/clips: `videos` synthetic scenes of `seconds` s
    preprocessed at SIZE px, 8 fps, 2 s clips (made once, then reused)."""
    from jobs.cli import main as cli
    from jobs.preprocess import PreprocessConfig, run

    name = f"data-{videos}x{seconds:g}s"
    stamp, made = work / f"{name}.json", {"videos": videos, "seconds": seconds, "size": SIZE}
    if stamp.exists() and json.loads(stamp.read_text()) == made and (work / name / "clips").is_dir():
        return work / name / "clips"
    shutil.rmtree(work / f"media-{name}", ignore_errors=True)
    shutil.rmtree(work / name, ignore_errors=True)
    cli(["synth", "--out", str(work / f"media-{name}"), "--videos", str(videos), "--seconds", f"{seconds:g}",
         "--size", "64"])
    run(PreprocessConfig(inputs=(str(work / f"media-{name}" / "manifest.jsonl"),), out=str(work / name), size=SIZE,
                         fps=8.0, num_cpus=2))
    stamp.write_text(json.dumps(made))
    return work / name / "clips"


def tiny_checkpoint(work: Path, clips: Path) -> str:
    """A freshly initialised tiny retrieval model (speed does not depend on training) with the
    clips' settings and a vocabulary fitted on their captions."""
    import torch

    from jobs.data import numpy_batches
    from jobs.tasks import get
    from jobs.train import clip_settings_of
    from models.checkpoint import save_checkpoint

    task = get("retrieval")
    text = ["video_id", "start_s", "end_s", "ground_truth"]
    rows = next(numpy_batches(str(clips), text, 10_000))
    cfg = task.fit(task.presets["tiny"], lambda cols: {c: rows[c] for c in cols if c in rows})
    torch.manual_seed(0)
    return str(save_checkpoint(work / "ret.pt", "retrieval", task.model(cfg), cfg,
                               extra={"epoch": 0, "clip_settings": clip_settings_of(str(clips)).to_dict()}))


def forward_alone(ckpt: str, clips: Path, batch_size: int, threads: int) -> float:
    """clips/s of encode_video + encode_audio on prepared batches held in memory."""
    import torch

    from jobs.data import numpy_batches
    from jobs.allocator import keep_freed_memory
    from jobs.embed import Embedder
    from jobs.tasks import get
    from jobs.tasks.base import as_tensors, to_model

    keep_freed_memory()  # the allocator setting avray embed's CPU actors run with
    torch.set_num_threads(threads)
    model = Embedder(ckpt, None, None, batch_size, "cpu").model
    torch.set_num_threads(threads)
    task = get("retrieval")
    staged = [to_model(as_tensors(task.prepare(b, model.cfg, targets=False)))
              for b in numpy_batches(str(clips), list(task.columns), batch_size)]
    n = sum(len(b["frames"]) for b in staged)
    with torch.inference_mode():
        model.encode_video(staged[0]["frames"])  # warm-up
        t0 = time.perf_counter()
        for b in staged:
            model.encode_video(b["frames"])
            model.encode_audio(b["logmel"])
    return n / (time.perf_counter() - t0)


def embed_run(ckpt: str, clips: Path, out: Path, batch_size: int) -> dict:
    from jobs.embed import EmbedConfig, run

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run(EmbedConfig(checkpoint=ckpt, data=str(clips), out=str(out), batch_size=batch_size))
    wall = time.perf_counter() - t0
    s = json.loads((out / "summary.json").read_text())["run"]
    return {"clips": s["clips"], "wall_s": wall, "clips_per_s": s["clips"] / wall}


def clustered(n: int, d: int, clusters: int, spread: float, seed: int):
    """n unit vectors around `clusters` centres (the same centres for every seed; seed: the draw)."""
    import numpy as np

    centres = np.random.default_rng(0).standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


KINDS = ("hnsw", "ivf")


def search_bench(n: int, d: int, queries: int, clusters: int, spread: float) -> list[dict]:
    """One row per index kind of KINDS (`avray index`'s defaults), each query timed exact and
    approximate back to back."""
    import numpy as np

    from jobs.index import IndexConfig, build_index
    from pipelines.embedstore import top_k

    x = clustered(n, d, clusters, spread, seed=1)
    q = clustered(queries, d, clusters, spread, seed=2)  # another draw: not the stored vectors
    pct = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    rows = []
    for kind in KINDS:
        t0 = time.perf_counter()
        index = build_index(x, IndexConfig(emb="-", kind=kind))
        build = time.perf_counter() - t0
        exact_ms, approx_ms, hits = [], [], []
        for v in q:
            t0 = time.perf_counter()
            _, e = top_k(v[None], x, 10)
            t1 = time.perf_counter()
            _, a = index.search(v[None], 10)
            t2 = time.perf_counter()
            exact_ms.append((t1 - t0) * 1000)
            approx_ms.append((t2 - t1) * 1000)
            hits.append(len(set(e[0].tolist()) & set(a[0].tolist())) / 10)
        rows.append({"n": n, "kind": kind, "build_s": build, "exact_p50": pct(exact_ms, 50),
                     "exact_p99": pct(exact_ms, 99), "approx_p50": pct(approx_ms, 50), "approx_p99": pct(approx_ms, 99),
                     "speedup": pct(exact_ms, 50) / pct(approx_ms, 50), "recall_at_10": float(np.mean(hits))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out" / "search"))
    ap.add_argument("--videos", type=int, default=600, help="scenes for the embed benchmark")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per scene (2 s clips: seconds / 2 a scene)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=0.1, help="noise around each cluster centre (per coordinate)")
    ap.add_argument("--skip-embed", action="store_true")
    ap.add_argument("--write", help="replace the search section of this Markdown file (BENCHMARKS.md)")
    a = ap.parse_args()

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    lines = []
    if not a.skip_embed:
        import ray

        from jobs.data import keep_idle_workers

        clips = make_clips(work, a.videos, a.seconds)
        ckpt = tiny_checkpoint(work, clips)
        keep_idle_workers()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            runs = []
            for r in range(a.runs):
                fwd = forward_alone(ckpt, clips, a.batch_size, threads=2)
                emb = embed_run(ckpt, clips, work / "emb", a.batch_size)
                runs.append({"forward": fwd, **emb, "ratio": emb["clips_per_s"] / fwd})
                print(f"run {r + 1}: forward alone {fwd:.1f} clips/s, avray embed {emb['clips_per_s']:.1f} clips/s "
                      f"({emb['clips']} clips in {emb['wall_s']:.1f} s), ratio {runs[-1]['ratio']:.2f}", flush=True)
        finally:
            ray.shutdown()
        med = {k: statistics.median(r[k] for r in runs) for k in ("forward", "clips_per_s", "wall_s", "ratio")}
        lines += [f"Embed: {runs[0]['clips']} clips ({a.videos} synthetic scenes of {a.seconds:g} s, {SIZE} px, 8 fps), the tiny "
                  f"retrieval preset, batch {a.batch_size}; medians of {a.runs} runs on 2 cores.", "",
                  "| | clips/s |", "|---|---|",
                  f"| model forward alone (encode_video + encode_audio, prepared batches in memory, 2 torch threads) | {med['forward']:.1f} |",
                  f"| `avray embed` (read, prepare, forward, write Parquet; 2 actors x 1 thread on a 2-CPU Ray; {med['wall_s']:.1f} s) | {med['clips_per_s']:.1f} |",
                  f"| ratio (target ≥ 0.8) | **{med['ratio']:.2f}** |", ""]
    res = []
    for n in a.sizes:
        for r in search_bench(n, DIM, a.queries, a.clusters, a.spread):
            res.append(r)
            print(f"{n} vectors: exact p50 {r['exact_p50']:.2f} ms, {r['kind']} p50 {r['approx_p50']:.3f} ms "
                  f"({r['speedup']:.0f}x), recall@10 {r['recall_at_10']:.3f}, built in {r['build_s']:.1f} s", flush=True)
    lines += [f"Search: {DIM}-d unit vectors in {a.clusters} clusters (spread {a.spread:g}), {a.queries} single "
              "queries drawn like the data; exact = one matrix product per query over memory (numpy, "
              "pipelines.embedstore.top_k); hnsw = FAISS IndexHNSWFlat, "
              f"M {IndexConfig.hnsw_m}, efSearch {IndexConfig.ef_search}; ivf = FAISS IndexIVFFlat, min(4 sqrt(N), "
              f"N / 39) cells, nprobe {IndexConfig.nprobe} (`avray index`'s defaults); the threads numpy and FAISS "
              "choose on 2 cores. Exact and approximate are timed back to back per query.", "",
              "| vectors | index | exact p50 / p99 ms | approximate p50 / p99 ms | speed-up (p50) | recall@10 | build s |",
              "|---|---|---|---|---|---|---|"]
    for r in res:
        lines.append(f"| {r['n']:,} | {r['kind']} | {r['exact_p50']:.2f} / {r['exact_p99']:.2f} | {r['approx_p50']:.3f} / "
                     f"{r['approx_p99']:.3f} | **{r['speedup']:.1f}x** | **{r['recall_at_10']:.3f}** | {r['build_s']:.1f} |")
    md = "\n".join(lines)
    print(md)
    if a.write:
        write_section(Path(a.write), "search", md)


if __name__ == "__main__":
    main()
