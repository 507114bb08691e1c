"""Cluster benchmark (loopback only): `avray preprocess` on one worker node vs two of a real
multi-node Ray on this machine (same total CPUs), and the Jobs API path vs a direct run.

Each topology is a `ray.cluster_utils.Cluster` in a child process of this script (`--child`):
a head without CPUs (it runs the driver, the GCS and, for the Jobs API, the dashboard on
127.0.0.1) and worker nodes, each its own raylet:

  (a) one worker node with 2 CPUs, `jobs.preprocess.run` called in the driver;
  (b) two worker nodes with 1 CPU each, the same call;
  (c) like (b), the same command submitted through the Jobs API (`JobSubmissionClient.submit_job`
      with the repository as `working_dir`; timed from the submission to SUCCEEDED, upload and
      the job's driver start included).

Inputs: --files synthetic videos of --seconds s (default 16 x 40 s) (320x240, 25 fps, H.264 + AAC) by
tests/mediagen.py; `--fps 8 --size 64 --clip-seconds 2`. Each run writes a fresh OUT. Medians of
--runs runs (the first also shown: its Ray workers start cold), media seconds per wall second,
and the ratios to (a).

    python benchmarks/cluster.py --runs 3 --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import write_section  # noqa: E402

SETTINGS = ["--fps", "8", "--size", "64", "--clip-seconds", "2"]
EXCLUDES = [".venv/", "demo/", "bench-out/", ".git/", "checkpoints/", "*.parquet", "*.mp4"]


def child(topology: str, media: Path, out_root: Path, runs: int) -> None:
    """In a child process: build the cluster of `topology`, time `runs` preprocess runs, print RESULT."""
    import ray
    from ray.cluster_utils import Cluster

    jobs_api = topology == "jobs"
    head = {"num_cpus": 0, "include_dashboard": jobs_api}
    if jobs_api:
        head["dashboard_host"] = "127.0.0.1"
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for cpus in ([2] if topology == "one" else [1, 1]):
        cluster.add_node(num_cpus=cpus)
    ctx = ray.init(address=cluster.address, log_to_driver=False)
    times = []
    try:
        for i in range(runs):
            out = out_root / f"{topology}-{i}"
            cmd = ["preprocess", str(media), "--out", str(out), *SETTINGS]
            t0 = time.perf_counter()
            if jobs_api:
                from ray.job_submission import JobStatus, JobSubmissionClient

                client = JobSubmissionClient(f"http://{ctx.dashboard_url}")
                job = client.submit_job(entrypoint=" ".join([sys.executable, "-m", "jobs.cli", *cmd]),
                                        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES})
                while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                        JobStatus.STOPPED}:
                    time.sleep(0.1)
                if status != JobStatus.SUCCEEDED:
                    raise RuntimeError(f"job {job} {status}: {client.get_job_logs(job)[-2000:]}")
            else:
                from jobs.cli import main

                if main([*cmd, "--address", cluster.address]) != 0:
                    raise RuntimeError(f"preprocess failed: {cmd}")
            times.append(time.perf_counter() - t0)
            summary = json.loads((out / "summary.json").read_text())
            if summary["run"]["files_failed"]:
                raise RuntimeError(f"{summary['run']['files_failed']} files failed")
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps({"topology": topology, "seconds": times}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", type=Path, help="rewrite the 'cluster' section of this Markdown file")
    ap.add_argument("--child", nargs=3, metavar=("TOPOLOGY", "MEDIA", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], Path(a.child[1]), Path(a.child[2]), a.runs)

    from tests import mediagen

    work = Path(tempfile.mkdtemp(prefix="avray-bench-cluster-"))
    try:
        media = work / "media"
        media.mkdir()
        for i in range(a.files):
            mediagen.write_video(media / f"v{i:02d}.mp4", seconds=a.seconds, width=320, height=240, fps=25)
        results, first = {}, {}
        for topology in ("one", "two", "jobs"):
            proc = subprocess.run([sys.executable, __file__, "--runs", str(a.runs), "--child", topology, str(media),
                                   str(work / "out")], capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{topology}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
            times = json.loads(lines[0][len("RESULT "):])["seconds"]
            results[topology], first[topology] = statistics.median(times), times[0]
        media_s = a.files * a.seconds
        rows = [("one worker node, 2 CPUs, run in the driver", "one"),
                ("two worker nodes, 1 CPU each, run in the driver", "two"),
                ("two worker nodes, 1 CPU each, submitted through the Jobs API", "jobs")]
        md = [f"`avray preprocess` of {a.files} files x {a.seconds:g} s (320x240 25 fps H.264 + AAC, "
              f"{' '.join(SETTINGS)}) on `ray.cluster_utils.Cluster` (a head with no CPUs + worker nodes, one "
              f"machine, 2 cores); medians of {a.runs} runs, each into a fresh OUT.", "",
              "| topology | wall s (median) | media s/s | vs one node | first run s (workers started cold) |",
              "|---|---|---|---|---|"]
        md += [f"| {label} | {results[k]:.1f} | {media_s / results[k]:.1f} | **{results['one'] / results[k]:.2f}x** "
               f"| {first[k]:.1f} |" for label, k in rows]
        text = "\n".join(md)
        print(text)
        if a.write:
            write_section(a.write, "cluster", text)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
