"""What a 1M-video `avray preprocess` costs the driver, measured on this machine.

The cluster benchmark (benchmarks/cluster.py) runs 16 files; this one times the driver-side steps
whose cost grows with the number of files, at the sizes of the plan in BENCHMARKS.md ("cluster"):
one process, no decoding. Each step is timed alone (median of --runs), with its peak memory
(one untimed run under tracemalloc: Python allocations, plus pyarrow's pool):

  manifest   `pipelines.sources.list_sources` of an N-row JSONL manifest (VGGSound-like rows:
             path, youtube_id, label, youtube_start_s): read, validated, ids hashed;
  done       `ClipStore.done()` over a folder of M finished part files (the rerun check: one
             listing of OUT/clips and OUT/errors), then the pending filter of the N ids;
  deal       `balanced_blocks` + `plan_tasks`: N files dealt into 8-file blocks (one stat each);
  summaries  the driver's per-file summary rows: N rows of SUMMARY_SCHEMA as `preprocess` keeps
             them (`to_pylist` of each task's table) and writes summary.json from;
  tasks      Ray's task round trip: --tasks empty tasks through `ray.wait` with a window of 2 per
             CPU, as `ingest_tasks` submits them, on a local Ray of 2 CPUs: the scheduler's floor
             per block of files.

    python benchmarks/scale.py --videos 1000000 --parts 200000 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402


def timed(fn, runs: int) -> tuple[float, float, object]:
    """(median seconds of `runs` runs, peak MB of Python + pyarrow allocations, the last result).
    The memory is taken in one more run before them, under tracemalloc (which slows allocation
    several times, so that run is not timed)."""
    import pyarrow as pa

    tracemalloc.start()
    pool0 = pa.total_allocated_bytes()
    out = fn()
    peak = (tracemalloc.get_traced_memory()[1] + max(0, pa.total_allocated_bytes() - pool0)) / 1e6
    tracemalloc.stop()
    del out
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), peak, out


def manifest(path: Path, n: int, media: Path) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"path": str(media / f"{i:011d}_000030.mp4"), "youtube_id": f"{i:011d}",
                                "label": f"class {i % 309}", "youtube_start_s": 30.0}) + "\n")


STEPS = ("manifest", "done", "deal", "footers", "summaries", "tasks")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=1_000_000, help="manifest rows (default 1M)")
    ap.add_argument("--parts", type=int, default=200_000, help="finished (empty) part files in OUT for the rerun check")
    ap.add_argument("--footers", type=int, default=20_000, help="real one-row Parquet parts whose footers are read")
    ap.add_argument("--tasks", type=int, default=4000, help="empty Ray tasks timed (default 4000)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=STEPS, help="time only these steps; the others keep the figures "
                    "of the last run in --results")
    ap.add_argument("--results", default=str(ROOT / "bench-out" / "scale.json"), help="default: bench-out/scale.json")
    ap.add_argument("--write", help="rewrite the scale section of this Markdown file (BENCHMARKS.md)")
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.clipstore import ClipStore
    from pipelines.ingest import SUMMARY_SCHEMA, balanced_blocks, plan_tasks
    from pipelines.sources import list_sources

    results = Path(args.results)
    res: dict[str, dict] = json.loads(results.read_text()) if args.only and results.exists() else {}
    todo = args.only or STEPS

    def record(name: str, **figures) -> None:
        res[name] = figures
        print(name, figures, flush=True)

    with tempfile.TemporaryDirectory(prefix="avray-scale-") as tmp:
        tmp = Path(tmp)
        media = tmp / "videos"
        media.mkdir()
        if "manifest" in todo:
            manifest(tmp / "m.jsonl", args.videos, media)
            s, mb, sources = timed(lambda: list_sources([str(tmp / "m.jsonl")]), args.runs)
            record("manifest", n=args.videos, s=s, mb=mb, table_mb=sources.nbytes / 1e6)
        elif {"done", "deal"} & set(todo):
            manifest(tmp / "m.jsonl", args.videos, media)
            sources = list_sources([str(tmp / "m.jsonl")])
        store = ClipStore(str(tmp / "out"))
        store.create()
        if "done" in todo:
            ids = sources.column("video_id").to_pylist()
            for v in ids[:args.parts]:
                open(store.part_path(store.kind, v), "wb").close()

            def done():
                have = store.done()
                return sources.filter(pa.array([v not in have for v in ids]))

            s, mb, pending = timed(done, args.runs)
            assert pending.num_rows == args.videos - args.parts
            record("done", n=args.videos, parts=args.parts, s=s, mb=mb)
        if "deal" in todo:
            def deal():
                blocks, _ = plan_tasks(sources.num_rows, [16] * 100)
                return balanced_blocks(sources, blocks)

            s, mb, blocks = timed(deal, args.runs)
            record("deal", n=args.videos, s=s, mb=mb, blocks=len(blocks))
        if "footers" in todo:  # the end of every run: OUT's clip count from every part's footer
            folder = tmp / "footers"
            folder.mkdir()
            pq.write_table(pa.table({"video_id": ["0" * 16], "x": [1]}), folder / "one.parquet")
            data = (folder / "one.parquet").read_bytes()
            paths = [str(folder / f"{i:016x}.parquet") for i in range(args.footers)]
            for p in paths:
                Path(p).write_bytes(data)
            s, mb, n = timed(lambda: store.count_rows(paths), args.runs)
            assert n == args.footers
            record("footers", n=args.footers, s=s, mb=mb)

    if "summaries" in todo:
        one = {"video_id": "0" * 16, "path": "/data/videos/00000000000_000030.mp4", "status": "ok", "clips": 5,
               "media_seconds": 10.0, "frames_decoded": 250, "seconds": 1.5, "stage": None, "error_type": None,
               "message": None}
        per_task = pa.Table.from_pylist([one] * 8, schema=SUMMARY_SCHEMA)

        def summaries():
            rows = []
            for _ in range(args.videos // 8):
                rows.extend(per_task.to_pylist())
            return len(rows)

        s, mb, _ = timed(summaries, 1)
        record("summaries", n=args.videos, s=s, mb=mb)

    if "tasks" in todo:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never another's Ray
        try:
            @ray.remote(num_cpus=1)
            def nothing(i: int) -> int:
                return i

            def tasks():
                pending, left, got = [], args.tasks, 0
                while left or pending:
                    while left and len(pending) < 4:
                        pending.append(nothing.remote(left))
                        left -= 1
                    ready, pending = ray.wait(pending, num_returns=1)
                    got += len(ray.get(ready))
                return got

            tasks()  # workers warm
            s, _, _ = timed(tasks, args.runs)
            record("tasks", n=args.tasks, s=s, per_s=args.tasks / s)
        finally:
            ray.shutdown()

    command = " ".join(["python benchmarks/scale.py", *sys.argv[1:]])
    res["command"] = f"{res['command']}`, then `{command}" if args.only and "command" in res else command
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(res, indent=2))
    md = report(res)
    print(md)
    if args.write:
        write_section(Path(args.write), "scale", md)


def report(r: dict) -> str:
    def per(x: float, n: int) -> str:
        return f"{x / n * 1e6:.1f} µs"

    rows = {
        "manifest": lambda m: (f"manifest: `list_sources` of a JSONL manifest", f"{m['n']:,} rows ({m['table_mb']:.0f} MB table)"),
        "done": lambda m: ("rerun check: `ClipStore.done()` (one listing) + pending filter",
                           f"{m['parts']:,} parts, {m['n']:,} ids"),
        "deal": lambda m: ("deal: `plan_tasks` + `balanced_blocks` (100 nodes x 16 CPUs; one stat a file)",
                           f"{m['n']:,} files -> {m['blocks']:,} blocks"),
        "footers": lambda m: ("end of run: OUT's clip count from every part's footer (`ClipStore.count_rows`)",
                              f"{m['n']:,} parts (local disk)"),
        "summaries": lambda m: ("per-file summary rows the driver keeps (dicts)", f"{m['n']:,} rows"),
    }
    lines = [f"Driver-side costs of `avray preprocess` that grow with the number of files (`{r.get('command')}`; "
             "one process on a 2-core machine, medians; memory: peak Python + pyarrow allocations in one more, "
             "untimed run):", "", "| step | size | wall s | per file | peak MB |", "|---|---|---|---|---|"]
    for name, label in rows.items():
        if name in r:
            what, size = label(r[name])
            lines.append(f"| {what} | {size} | {r[name]['s']:.1f} | {per(r[name]['s'], r[name]['n'])} | {r[name]['mb']:.0f} |")
    if "tasks" in r:
        t = r["tasks"]
        lines.append(f"| Ray task round trip (empty task, window 4, local Ray of 2 CPUs) | {t['n']:,} tasks | "
                     f"{t['s']:.2f} | {t['per_s']:,.0f} tasks/s | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
