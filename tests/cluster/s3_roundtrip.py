"""Run in its own process (tests/test_s3.py): avray on an S3-compatible object store started here
(moto's ThreadedMotoServer on 127.0.0.1; its address and fake credentials in the AWS_* environment
before Ray starts, so every Ray worker reads them, as on a cluster whose nodes are configured
for S3). Synthetic scenes go to s3://avray/media/, a local manifest lists them as s3:// URIs
(plus one object that is not there); `avray preprocess` reads them through pyarrow.fs and writes
OUT to s3://avray/out/; a rerun skips every file; without `--allow-scheme s3` nothing is opened;
`avray train`, `avray evaluate` and `avray embed` read the clips from S3. Prints one line, RESULT and a JSON object.

    python tests/cluster/s3_roundtrip.py WORK_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BUCKET = "avray"
SETTINGS = ["--clip-seconds", "1", "--fps", "4", "--size", "64"]


def main() -> None:
    from moto.server import ThreadedMotoServer

    work = Path(sys.argv[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://{host}:{port}")
    try:
        import boto3
        import pyarrow.compute as pc
        import pyarrow.dataset as pads
        import pyarrow.fs as pafs

        import ray

        from jobs.cli import main as avray

        # one local Ray for every command (each would start its own), its workers with the AWS_* above
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
        assert avray(["synth", "--out", str(work / "media"), "--videos", "4", "--seed", "2", "--seconds", "2",
                      "--size", "64", "--fps", "10"]) == 0
        rows = []
        for line in (work / "media" / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["path"] == "scene_00003.mp4":  # silent in its first second (tests/test_train.py)
                continue
            with open(work / "media" / row["path"], "rb") as src, fs.open_output_stream(f"{BUCKET}/media/{row['path']}") as dst:
                dst.write(src.read())
            rows.append({**row, "path": f"s3://{BUCKET}/media/{row['path']}"})
        rows.append({"path": f"s3://{BUCKET}/media/not_uploaded.mp4"})
        manifest = work / "s3.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))

        out = f"s3://{BUCKET}/out"
        refused = avray(["preprocess", str(manifest), "--out", str(work / "refused"), *SETTINGS])
        refused_errors = pads.dataset(str(work / "refused" / "errors"), format="parquet").to_table().to_pylist()
        first = avray(["preprocess", str(manifest), "--out", out, "--allow-scheme", "s3", *SETTINGS])
        summary = json.loads(fs.open_input_stream(f"{BUCKET}/out/summary.json").read())
        again = avray(["preprocess", str(manifest), "--out", out, "--allow-scheme", "s3", *SETTINGS])
        summary_again = json.loads(fs.open_input_stream(f"{BUCKET}/out/summary.json").read())
        clips = pads.dataset(f"{out}/clips", format="parquet").to_table(columns=["clip_id", "source_path", "start_s"])
        errors = pads.dataset(f"{out}/errors", format="parquet").to_table().to_pylist()
        leftovers = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/out", recursive=True))
                     if i.base_name.startswith(".tmp-")]
        trained = avray(["train", "--task", "localization", "--data", f"{out}/clips", "--out", str(work / "run"),
                         "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25"])
        evaluated = avray(["evaluate", "--task", "localization", "--checkpoint", str(work / "run" / "model.pt"),
                           "--data", f"{out}/clips", "--out", str(work / "eval"), "--split", "all"])
        report = json.loads((work / "eval" / "metrics.json").read_text()) if evaluated == 0 else {}
        retrieval = Path(__file__).resolve().parents[2] / "checkpoints" / "retrieval.pt"
        embedded = avray(["embed", "--checkpoint", str(retrieval), "--data", f"{out}/clips", "--out", str(work / "emb"),
                          "--actors", "1"])
        vectors = pads.dataset(str(work / "emb" / "embeddings"), format="parquet").to_table(columns=["clip_id"]) \
            if embedded == 0 else None
        print("RESULT " + json.dumps({
            "refused_rc": refused, "refused_errors": [(e["stage"], e["message"]) for e in refused_errors],
            "first_rc": first, "files_ok": summary["run"]["files_ok"], "files_failed": summary["run"]["files_failed"],
            "again_rc": again, "skipped_again": summary_again["run"]["files_skipped_done"],
            "clips": clips.num_rows, "sources": sorted(set(clips.column("source_path").to_pylist())),
            "starts": sorted(set(pc.unique(clips.column("start_s")).to_pylist())),
            "errors": [(e["path"], e["stage"], e["message"]) for e in errors], "leftovers": leftovers,
            "train_rc": trained, "evaluate_rc": evaluated, "evaluated_clips": report.get("clips"),
            "evaluated_data": report.get("data"), "embed_rc": embedded,
            "embedded": sorted(vectors.column("clip_id").to_pylist()) if vectors is not None else None,
            "clip_ids": sorted(pads.dataset(f"{out}/clips", format="parquet").to_table(columns=["clip_id"])
                               .column("clip_id").to_pylist())}))
    finally:
        import ray

        ray.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
