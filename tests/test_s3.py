"""avray on an S3-compatible object store started by the test (moto's server on 127.0.0.1, in
its own process with the AWS_* environment set before Ray starts: tests/cluster/s3_roundtrip.py):
inputs listed in a manifest as s3:// URIs, OUT on S3, train, evaluate and embed reading it there."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOT_ALLOWED = "URI scheme 's3' is not allowed (local files only; allow it explicitly with --allow-scheme s3)"


def test_preprocess_train_and_evaluate_through_s3(tmp_path):
    script = Path(__file__).resolve().parent / "cluster" / "s3_roundtrip.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    # without --allow-scheme s3 nothing is opened: every listed object is an error row, the run itself succeeds
    assert res["refused_rc"] == 0 and res["refused_errors"] == [["open", NOT_ALLOWED]] * 4
    scenes = [f"s3://avray/media/scene_{i:05d}.mp4" for i in range(3)]
    assert (res["first_rc"], res["files_ok"], res["files_failed"]) == (0, 3, 1)
    assert res["errors"] == [["s3://avray/media/not_uploaded.mp4", "missing",
                              "no such object: s3://avray/media/not_uploaded.mp4"]]
    assert (res["clips"], res["sources"], res["starts"]) == (6, scenes, [0.0, 1.0])  # 2 s scenes, 1 s clips
    assert res["leftovers"] == []  # no temporary part left on S3
    assert (res["again_rc"], res["skipped_again"]) == (0, 4)  # a rerun opens nothing: 3 parts and 1 error row
    assert (res["train_rc"], res["evaluate_rc"], res["evaluated_clips"]) == (0, 0, 6)
    assert res["evaluated_data"] == "s3://avray/out/clips"
    assert res["embed_rc"] == 0 and res["embedded"] == res["clip_ids"] and len(res["clip_ids"]) == 6
