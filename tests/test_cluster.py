"""A real multi-node Ray on this machine (`ray.cluster_utils.Cluster`, in its own process beside
the session's local Ray): a worker node lost in the middle of `avray preprocess` costs no clip and
duplicates none; and a `ray start` cluster with token authentication taking avray's commands
through the Jobs API, its stages placed by custom resources (tests/cluster/jobs_auth.py)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import mediagen

FILES, SECONDS = 12, 6.0


def test_a_worker_node_lost_during_preprocess_loses_and_duplicates_nothing(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for i in range(FILES):
        mediagen.write_video(media / f"v{i:02d}.mp4", seconds=SECONDS, width=320, height=240, fps=25)
    script = Path(__file__).resolve().parent / "cluster" / "node_loss.py"
    proc = subprocess.run([sys.executable, str(script), str(media), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["removed"] and res["parts_when_removed"] < FILES  # the node went while files were left
    assert res["alive_nodes"] == 2  # the head and the surviving worker
    # every clip of every file, once: the lost node's task ran again on the other, skipping the files
    # it had committed before the node went (those count as skipped, done already)
    assert (res["rc"], res["files_failed"], res["files_ok"] + res["files_skipped"]) == (0, 0, FILES)
    assert res["clips"] == res["unique_clips"] == res["out_clips"] == FILES * int(SECONDS)
    from pipelines.sources import video_id
    expected = sorted(f"{video_id(str((media / f'v{i:02d}.mp4').resolve()))}-{k:05d}" for i in range(FILES) for k in range(int(SECONDS)))
    assert res["clip_ids"] == expected


def test_a_train_workers_node_lost_after_a_checkpoint_resumes_on_the_other_node(ray_local, tmp_path):
    from jobs.cli import main
    from jobs.preprocess import PreprocessConfig
    from jobs.preprocess import run as preprocess

    assert main(["synth", "--out", str(tmp_path / "media"), "--videos", "8", "--seed", "2", "--seconds", "2",
                 "--size", "64", "--fps", "10"]) == 0
    # seed 2's scene 3 is silent in its first second: without it every held-out video has boxes (tests/test_train.py)
    rows = [json.loads(line) for line in (tmp_path / "media" / "manifest.jsonl").read_text().splitlines()]
    (tmp_path / "media" / "kept.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["path"] != "scene_00003.mp4"))
    assert preprocess(PreprocessConfig(inputs=(str(tmp_path / "media" / "kept.jsonl"),), out=str(tmp_path / "data"),
                                       clip_seconds=1.0, fps=4.0, size=64)) == 0
    epochs = 4  # an epoch on this cluster takes seconds (Ray Data starts its reads on other nodes): the loss lands mid-run
    script = Path(__file__).resolve().parent / "cluster" / "train_node_loss.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "data" / "clips"), str(tmp_path / "run"), str(epochs)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["rc"] == 0 and res["lost_node"] is not None and res["checkpoints_when_lost"] == 1
    assert res["alive"] == res["survivor"]  # the run finished on the node that was left
    assert res["epochs"] == list(range(epochs)) and res["model"]
    assert res["start_epochs"] == [0] + [1] * (epochs - 1)  # resumed from the epoch-0 checkpoint, not restarted


def test_a_serve_replicas_node_lost_answers_again_within_a_bounded_time(tmp_path):
    import socket

    from jobs.cli import main

    assert main(["synth", "--out", str(tmp_path / "media"), "--videos", "1", "--seed", "3", "--seconds", "2",
                 "--size", "96", "--fps", "10"]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    script = root / "tests" / "cluster" / "serve_node_loss.py"
    proc = subprocess.run([sys.executable, str(script), str(root / "checkpoints" / "localization.pt"),
                           str(tmp_path / "media" / "scene_00000.mp4"), str(port)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["before"] == [200, 200, 200] and res["after"] == [200, 200, 200], res["not_ok"]
    # three 200s in a row again after 19-23 s on 2 busy cores (Ray marks the node dead, Serve's
    # controller starts the replicas again on the node that is left)
    assert res["recovered_s"] is not None and res["recovered_s"] < 90, res["not_ok"]
    assert set(res["failed_statuses"]) <= {0, 500, 502, 503, 504}, res["not_ok"]  # no answer, or a server error
    assert res["lost_node"] not in res["alive"] and res["alive"] == res["survivor"]  # answered from the node left


@pytest.mark.slow
def test_jobs_api_with_token_auth_on_a_multi_node_cluster_places_stages_on_their_nodes(tmp_path):
    """`ray start` head (no CPUs) + a `decode` and a `train` worker node, all with
    RAY_AUTH_MODE=token: without the token the Jobs API refuses (401, wrong token 403, `ray job
    submit` fails); with it, `avray preprocess` (via `ray job submit --working-dir`), `avray train`
    and `avray evaluate` run as jobs, decode tasks on the decode node and the Train worker on the
    train node; a failing job says why in its status; `serve deploy` of the trained model answers."""
    script = Path(__file__).resolve().parent / "cluster" / "jobs_auth.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[len("RESULT "):])
    assert res["nodes"] == {"head_cpus": [0], "decode": 1, "train": 1}
    assert res["refused"] == {"no_token": {"status": 401, "body": "Unauthorized: Missing authentication token"},
                              "wrong_token": "Authentication failed: Forbidden: Invalid authentication token",
                              "serve_api_no_token": 401}
    assert res["cli_no_token"] == {"rc": 1, "authentication_required": True}
    pre = res["preprocess"]
    assert (pre["rc"], pre["status"], pre["cli_says_succeeded"], pre["logs_have_summary"]) == (0, "SUCCEEDED", True, True), pre
    assert (pre["files_ok"], pre["clips"]) == (4, 8)  # 4 scenes of 2 s, 1 s clips
    assert pre["decode_tasks"] >= 1 and pre["decode_task_nodes"] == [True]  # every decode task on the decode node
    bad = res["bad"]
    assert bad["status"] == "FAILED"
    assert bad["message"].startswith("Job entrypoint command failed with exit code 2")
    assert f"avray preprocess: error: no video files found in ['{tmp_path / 'empty'}']" in bad["message"]
    train = res["train"]
    assert (train["status"], train["logs_have_epoch"], train["workers"]) == ("SUCCEEDED", True, 1), train
    assert train["worker_on_train_node"] == [True]
    assert (res["evaluate"]["status"], res["evaluate"]["metrics"]) == ("SUCCEEDED", "localization"), res["evaluate"]
    serve = res["serve"]
    assert (serve["deploy_rc"], serve["app_status"], serve["status_code"]) == (0, "RUNNING", 200), serve
    assert (serve["fps"], serve["frames"]) == (4.0, 8)  # the checkpoint's clip settings: 4 fps over the 2 s upload
