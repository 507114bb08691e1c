"""Ingest benchmark: `avray preprocess` on a 2-CPU local Ray against a plain loop, same inputs.

One run measures, on the same files (240 s of 720p H.264/AAC made from Big Buck Bunny, plus
the real videos in ../shared/media/video):

  (a) a plain single-process loop over `pipelines.ingest.ingest_file` (decode + resize in
      FFmpeg + log-mel + Parquet write: exactly the per-file work, no Ray);
  (b) `avray preprocess` (jobs.preprocess.run) on a local Ray with 2 CPUs: "cold" includes
      starting Ray and its workers (what a laptop user waits for), "warm" reruns into a fresh
      OUT on the same Ray (what a job on a running cluster sees);
  (c) multiprocessing.Pool(2) over the same function (workers started and warmed before the
      clock starts): the 2-core reference a Ray pipeline has to approach;
  the decode-only ceiling (`ffmpeg -threads 1 -i X -f null -`, and PyAV decoding every packet
  with one thread) x 2 cores; and peak memory (PSS summed over the driver and every Ray
  process) of (b) for 10 vs 100 input videos.

With --set 720p60: issue 19's 8 files of 60 s 720p30 (made by the ffmpeg CLI), against the
two-ffmpeg decode ceiling: Pool(2), `avray preprocess` warm and cold at 8 fps, a 2-file job, and
1 fps with every frame decoded, the seek path and keyframes only (section 'ingest-720p').

Each timing is the median of --runs runs. Results are printed as Markdown and, with
--write BENCHMARKS.md, replace the section between the ingest markers there.

    python benchmarks/ingest.py --runs 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402
SHARED_VIDEO = ROOT.parent / "shared" / "media" / "video"
BBB = SHARED_VIDEO / "big_buck_bunny_0_30.webm"


def make_720p_inputs(dst: Path, seconds: float) -> list[Path]:
    """720p H.264 + AAC files of 10 s each, totalling >= `seconds`: six encodes of Big Buck
    Bunny's three 10 s segments (plain and mirrored; a moving noise texture if BBB is absent),
    the rest byte copies of those under other names."""
    import av
    import numpy as np

    dst.mkdir(parents=True, exist_ok=True)
    n = max(1, int(np.ceil(seconds / 10)))
    files = [dst / f"bbb720_{i:02d}.mp4" for i in range(n)]
    if all(f.exists() for f in files):
        return files
    for i, path in enumerate(files):
        if i >= 6:  # six distinct encodes; the rest are byte copies under other names
            shutil.copy(files[i % 6], path)
            continue
        seg, mirror = i % 3, i >= 3
        out = av.open(str(path), "w")
        vs = out.add_stream("libx264", rate=24, options={"crf": "23", "preset": "veryfast"})
        vs.width, vs.height, vs.pix_fmt = 1280, 720, "yuv420p"
        as_ = out.add_stream("aac", rate=44100, layout="stereo")
        if BBB.exists():
            src = av.open(str(BBB))
            src.seek(int(seg * 10 * 1e6))
            t0 = None
            for frame in src.decode(src.streams.video[0], src.streams.audio[0]):
                t0 = frame.time if t0 is None else t0
                if frame.time - t0 >= 10.0:
                    break
                if isinstance(frame, av.VideoFrame):
                    img = frame.to_ndarray(format="rgb24")
                    img = img[:, ::-1] if mirror else img
                    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                    vf.pts = None
                    for p in vs.encode(vf):
                        out.mux(p)
                else:
                    frame.pts = None
                    for p in as_.encode(frame):
                        out.mux(p)
            src.close()
        else:  # moving noise texture + tone: a fallback with real encoding cost
            rng = np.random.default_rng(i)
            tex = rng.integers(0, 255, (720, 1280 + 240, 3), dtype=np.uint8)
            for k in range(240):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(tex[:, k:k + 1280]), format="rgb24")
                for p in vs.encode(vf):
                    out.mux(p)
            t = np.arange(441000) / 44100
            wave = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
            for s in range(0, len(wave), 1024):
                af = av.AudioFrame.from_ndarray(np.stack([wave[s:s + 1024]] * 2), format="fltp", layout="stereo")
                af.sample_rate = 44100
                for p in as_.encode(af):
                    out.mux(p)
        for s in (vs, as_):
            for p in s.encode(None):
                out.mux(p)
        out.close()
    return files


class PeakMemory:
    """Samples the summed PSS of a process and all its descendants every 0.1 s."""

    def __init__(self, pid: int) -> None:
        import psutil
        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        while not self._stop.is_set():
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.1)

    def __enter__(self) -> "PeakMemory":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def _ingest_cfg(size: int, fps: float):
    from pipelines.ingest import IngestConfig
    from pipelines.decode import DecodeConfig
    return IngestConfig(decode=DecodeConfig(size=size, fps=fps))


def _plain_one(args: tuple) -> dict:
    from pipelines.clipstore import ClipStore
    from pipelines.ingest import ingest_file
    import torch
    torch.set_num_threads(1)
    src, out, cfg, schema = args
    return ingest_file(src, ClipStore(out), cfg, schema)


def run_plain(files: list[Path], out: Path, size: int, fps: float, procs: int) -> tuple[float, list[dict]]:
    """(a) procs=1 in this process, (c) procs=2 with multiprocessing.Pool: wall seconds, summaries."""
    from pipelines.clipstore import ClipStore
    from pipelines.schema import CLIP_SCHEMA
    from pipelines.sources import list_sources

    shutil.rmtree(out, ignore_errors=True)
    ClipStore(str(out)).create()
    cfg = _ingest_cfg(size, fps)
    jobs = [(src, str(out), cfg, CLIP_SCHEMA) for src in list_sources([str(f) for f in files]).to_pylist()]
    if procs == 1:
        t0 = time.perf_counter()
        rows = [_plain_one(j) for j in jobs]
        return time.perf_counter() - t0, rows
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        pool.map(_warm, range(procs), chunksize=1)  # imports done before timing, as for warm Ray
        t0 = time.perf_counter()
        rows = pool.map(_plain_one, jobs, chunksize=1)
        return time.perf_counter() - t0, rows


def _warm(_: int) -> None:
    import pipelines.ingest  # noqa: F401  (torch, av, pyarrow)


def run_ray(files: list[Path], out: Path, size: int, fps: float, **decode) -> float:
    """`avray preprocess` (jobs.preprocess.run) into a fresh `out`; `decode`: seek, keyframes_only."""
    from jobs.preprocess import PreprocessConfig, run
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    run(PreprocessConfig(inputs=tuple(str(f) for f in files), out=str(out), size=size, fps=fps, **decode))
    return time.perf_counter() - t0


ISSUE_SET = ("-f lavfi -i testsrc2=s=1280x720:r=30:d={d} -f lavfi -i sine=f={f}:r=44100:d={d} -c:v libx264 "
             "-preset veryfast -g 60 -pix_fmt yuv420p -c:a aac -ac 2")


def make_issue_set(dst: Path, files: int, seconds: int) -> list[Path]:
    """`files` files of `seconds` s of 720p30 H.264 (keyframe every 2 s) + AAC stereo, made by the
    ffmpeg CLI with ISSUE_SET (a tone of its own per file)."""
    if not shutil.which("ffmpeg"):
        raise SystemExit("the 720p set needs the ffmpeg CLI: apt-get install ffmpeg")
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(files):
        path = dst / f"testsrc2_720p30_{seconds}s_{i:02d}.mp4"
        if not path.exists():
            tmp = path.with_suffix(".part.mp4")
            subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *ISSUE_SET.format(d=seconds, f=300 + 50 * i).split(),
                            str(tmp)], check=True, stdin=subprocess.DEVNULL)
            tmp.rename(path)
        out.append(path)
    return out


def ffmpeg_decode(path: Path, threads: int) -> list[str]:
    """The decode-only command: `ffmpeg -threads N -i path -f null -` (stdin unused)."""
    return ["ffmpeg", "-nostdin", "-v", "error", "-threads", str(threads), "-i", str(path), "-f", "null", "-"]


def two_ffmpeg_ceiling(files: list[Path]) -> float:
    """Wall seconds of `ffmpeg -threads 1 -i F -f null -` over `files`, two processes at a time."""
    t0 = time.perf_counter()
    queue, running = list(files), []
    while queue or running:
        while queue and len(running) < 2:
            running.append(subprocess.Popen(ffmpeg_decode(queue.pop(0), 1), stdin=subprocess.DEVNULL))
        while all(p.poll() is None for p in running):
            time.sleep(0.005)
        running = [p for p in running if p.poll() is None]
    return time.perf_counter() - t0


def ffmpeg_seconds(path: Path, threads: int) -> float:
    """Wall seconds of `ffmpeg -threads N -i path -f null -`."""
    t0 = time.perf_counter()
    subprocess.run(ffmpeg_decode(path, threads), check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_720p(work: Path, runs: int, size: int) -> str:
    """Issue 19's set: 8 files of 60 s 720p30, each figure a median of `runs`, against the
    two-ffmpeg decode ceiling measured in the same run. Returns the Markdown section."""
    import ray

    files = make_issue_set(work / "inputs-720p60", 8, 60)
    two = files[:2]
    t: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        t.setdefault(key, []).append(value)
        print(f"  {key}: {value:.2f} s", flush=True)

    for r in range(runs):
        print(f"run {r + 1}", flush=True)
        add("ceiling", two_ffmpeg_ceiling(files))
        add("ceiling2", two_ffmpeg_ceiling(two))
        for threads in (1, 2):
            add(f"ffmpeg_t{threads}", ffmpeg_seconds(files[0], threads))
        add("pool", run_plain(files, work / "out-720-pool", size, 8.0, procs=2)[0])
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_ray(files, work / "out-720", size, 8.0)
        add("cold", time.perf_counter() - t0)
        add("warm", run_ray(files, work / "out-720", size, 8.0))
        add("warm2", run_ray(two, work / "out-720-2", size, 8.0))
        add("warm1", run_ray(files[:1], work / "out-720-1f", size, 8.0))  # one file: decoder threads = CPUs
        add("fps1_full", run_ray(files, work / "out-720-1", size, 1.0, seek="never"))
        add("fps1_seek", run_ray(files, work / "out-720-1", size, 1.0, seek="auto"))
        add("fps1_key", run_ray(files, work / "out-720-1", size, 1.0, keyframes_only=True))
        ray.shutdown()
    m = {k: statistics.median(v) for k, v in t.items()}
    media = 8 * 60.0
    c, c2 = m["ceiling"], m["ceiling2"]

    def row(name: str, key: str, ceiling: float, n_media: float = media) -> str:
        return f"| {name} | {m[key]:.2f} | {n_media / m[key]:.1f} | **{ceiling / m[key]:.2f}** |"

    return "\n".join([
        f"Inputs: 8 files of 60 s 720p30 H.264 (keyframe every 2 s) + AAC stereo, `ffmpeg {ISSUE_SET.format(d=60, f='300+50i')}`"
        f" (480 media s); `--size {size} --clip-seconds 2 --sample-rate 16000`; medians of {runs} runs; {os.cpu_count()} cores; "
        "each ceiling measured in the same run.", "",
        "| what | wall s | media s/s | of the ceiling |", "|---|---|---|---|",
        f"| decode-only ceiling: two `ffmpeg -threads 1 -i F -f null -` at a time | {c:.2f} | {media / c:.1f} | 1.00 |",
        row("`multiprocessing.Pool(2)` over `pipelines.ingest.ingest_file`, 8 fps", "pool", c),
        row("`avray preprocess --fps 8`, warm (Ray running; the command's own wall time)", "warm", c),
        row("`avray preprocess --fps 8`, cold (counted from `ray.init`)", "cold", c),
        f"| the same, warm, on 2 of the files (ceiling {c2:.2f} s) | {m['warm2']:.2f} | {120 / m['warm2']:.1f} | **{c2 / m['warm2']:.2f}** |",
        f"| one file, warm (decoder threads = the 2 CPUs; `ffmpeg -threads 1`: {m['ffmpeg_t1']:.2f} s, "
        f"`-threads 2`: {m['ffmpeg_t2']:.2f} s) | {m['warm1']:.2f} | {60 / m['warm1']:.1f} | "
        f"**{m['ffmpeg_t2'] / m['warm1']:.2f}** of `-threads 2`, {m['ffmpeg_t1'] / m['warm1']:.2f} of `-threads 1` |",
        row("`--fps 1 --seek never` (every frame decoded), warm", "fps1_full", c),
        row("`--fps 1` (seek path, the same frames), warm", "fps1_seek", c),
        row("`--fps 1 --keyframes-only` (approximate in time), warm", "fps1_key", c),
        "",
        f"At 1 fps the seek path runs at {m['fps1_full'] / m['fps1_seek']:.2f}x the full decode's media s/s "
        f"(target 5x), keyframes only at {m['fps1_full'] / m['fps1_key']:.2f}x.",
    ])


def decode_ceiling(files: list[Path]) -> dict[str, float]:
    """Media seconds decoded per second by one thread: ffmpeg CLI (if installed) and PyAV."""
    import av
    media = 0.0
    t_av = 0.0
    for f in files:
        with av.open(str(f)) as c:
            streams = [s for s in (c.streams.best("video"), c.streams.best("audio")) if s is not None]
            for s in streams:
                s.codec_context.thread_count = 1
            media += (c.duration or 0) / 1e6
            t0 = time.perf_counter()
            for packet in c.demux(*streams):
                for _ in packet.decode():
                    pass
            t_av += time.perf_counter() - t0
    res = {"media_seconds": media, "pyav_media_s_per_s": media / t_av}
    if shutil.which("ffmpeg"):
        res["ffmpeg_media_s_per_s"] = media / sum(ffmpeg_seconds(f, 1) for f in files)
    return res


def _memory_child(files_json: str, out: str, size: int, fps: float) -> None:
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    run_ray([Path(f) for f in json.loads(files_json)], Path(out), size, fps)
    ray.shutdown()


def peak_memory(files: list[Path], out: Path, size: int, fps: float) -> float:
    """Peak PSS (MB) of `avray preprocess` over `files`, in a fresh process with its own Ray."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.ingest import _memory_child; "
            f"_memory_child({json.dumps(json.dumps([str(f) for f in files]))}, {str(out)!r}, {size}, {fps})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with PeakMemory(proc.pid) as mem:
        proc.wait()
    if proc.returncode:
        raise RuntimeError(f"memory run failed with exit code {proc.returncode}")
    return mem.peak / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "bench-out"), help="inputs and outputs (default: bench-out/)")
    ap.add_argument("--seconds-720p", type=float, default=240.0, help="seconds of 720p H.264/AAC input")
    ap.add_argument("--runs", type=int, default=3, help="runs per timing; medians are reported")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--memory-videos", type=int, nargs=2, default=(10, 100), help="video counts compared for memory")
    ap.add_argument("--write", help="replace the ingest section of this Markdown file (BENCHMARKS.md)")
    ap.add_argument("--set", choices=("mixed", "720p60"), default="mixed",
                    help="mixed: BBB 720p + the shared videos (section 'ingest'); 720p60: 8 files of 60 s "
                         "720p30 made by the ffmpeg CLI, against the two-ffmpeg ceiling (section 'ingest-720p')")
    args = ap.parse_args()

    import ray

    work = Path(args.workdir)
    if args.set == "720p60":
        md = bench_720p(work, args.runs, args.size)
        print(md)
        if args.write:
            write_section(Path(args.write), "ingest-720p", md)
        return
    files = make_720p_inputs(work / "inputs", args.seconds_720p)
    if SHARED_VIDEO.is_dir():
        files += sorted(SHARED_VIDEO.iterdir())
    print(f"{len(files)} input files", flush=True)

    plain, pool, warm = [], [], []
    for _ in range(args.runs):
        plain.append(run_plain(files, work / "out-a", args.size, args.fps, procs=1))
        pool.append(run_plain(files, work / "out-c", args.size, args.fps, procs=2)[0])
    rows = plain[0][1]
    media = sum(r["media_seconds"] for r in rows)
    frames = sum(r["frames_decoded"] for r in rows)
    clips = sum(r["clips"] for r in rows)
    t_plain = statistics.median(t for t, _ in plain)
    t_pool = statistics.median(pool)

    cold, fixed = [], []
    smallest = min(files, key=lambda f: f.stat().st_size)
    for _ in range(args.runs):
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        run_ray(files, work / "out-b", args.size, args.fps)
        cold.append(time.perf_counter() - t0)
        warm.append(run_ray(files, work / "out-b", args.size, args.fps))
        # the job's fixed cost: the same command on the smallest file alone, minus that file's work
        t_small = run_ray([smallest], work / "out-small", args.size, args.fps)
        fixed.append(t_small - run_plain([smallest], work / "out-small-a", args.size, args.fps, procs=1)[0])
        ray.shutdown()
    t_cold, t_warm, t_fixed = statistics.median(cold), statistics.median(warm), statistics.median(fixed)
    ceiling = decode_ceiling(files)

    mem_inputs = work / "mem-inputs"
    if not (mem_inputs / f"scene_{max(args.memory_videos) - 1:05d}.mp4").exists():
        from jobs.cli import main as cli
        cli(["synth", "--out", str(mem_inputs), "--videos", str(max(args.memory_videos)), "--seconds", "4",
             "--size", "256", "--seed", "0"])
    scenes = sorted(mem_inputs.glob("scene_*.mp4"))
    mem = {n: peak_memory(scenes[:n], work / f"out-mem{n}", args.size, args.fps) for n in args.memory_videos}

    n_small, n_big = args.memory_videos
    res = {
        "inputs": {"files": len(files), "media_seconds": round(media, 1), "frames_decoded": frames, "clips": clips},
        "median_seconds": {"plain": t_plain, "pool2": t_pool, "ray_cold": t_cold, "ray_warm": t_warm,
                           "ray_fixed_per_job": t_fixed},
        "runs": args.runs, "ceiling": ceiling, "peak_mb": mem, "cpus": os.cpu_count(),
    }
    (work / "ingest.json").write_text(json.dumps(res, indent=2))

    def rate(t: float) -> str:
        return f"{media / t:.1f} | {frames / t:.0f}"

    ff = ceiling.get("ffmpeg_media_s_per_s")
    md = "\n".join([
        f"Inputs: {len(files)} files, {media:.1f} media s ({frames} frames decoded, {clips} clips of 2 s at "
        f"{args.fps:g} fps, {args.size} px); medians of {args.runs} runs; {os.cpu_count()} cores.",
        "",
        "| pipeline | wall s | media s/s | decoded frames/s | vs (a) |",
        "|---|---|---|---|---|",
        f"| (a) plain loop, 1 process | {t_plain:.2f} | {rate(t_plain)} | 1.00 |",
        f"| (c) multiprocessing.Pool(2) | {t_pool:.2f} | {rate(t_pool)} | {t_plain / t_pool:.2f} |",
        f"| (b) avray preprocess, Ray 2 CPUs, warm | {t_warm:.2f} | {rate(t_warm)} | **{t_plain / t_warm:.2f}** |",
        f"| (b) avray preprocess, Ray 2 CPUs, cold (incl. ray.init) | {t_cold:.2f} | {rate(t_cold)} | {t_plain / t_cold:.2f} |",
        f"| (b) warm less its fixed cost per job ({t_fixed:.2f} s: the same command on one small file, "
        f"less that file's work) | {t_warm - t_fixed:.2f} | {rate(t_warm - t_fixed)} | {t_plain / (t_warm - t_fixed):.2f} |",
        "",
        f"Decode-only ceiling x 2 cores: PyAV (FFmpeg 8, 1 thread) {2 * ceiling['pyav_media_s_per_s']:.1f} media s/s"
        + (f", ffmpeg CLI (`-threads 1 -f null`) {2 * ff:.1f} media s/s" if ff else "")
        + f"; (b) warm reaches {media / t_warm / (2 * (ff or ceiling['pyav_media_s_per_s'])):.0%} of it.",
        "",
        f"Peak memory of (b), PSS over driver + Ray processes: {n_small} videos {mem[n_small]:.0f} MB, "
        f"{n_big} videos {mem[n_big]:.0f} MB (ratio {mem[n_big] / mem[n_small]:.2f}).",
    ])
    print(md)
    if args.write:
        write_section(Path(args.write), "ingest", md)

if __name__ == "__main__":
    main()
