"""Run in its own process (tests/test_cluster.py): avray's commands submitted through Ray's Jobs
API to a real multi-node Ray with token authentication, as a user submits them.

The cluster (tests/cluster/raystart.py): `ray start --head --num-cpus 0` (the dashboard and Jobs
API on 127.0.0.1) and two 1-CPU worker nodes, one with the custom resource `decode`, one with
`train`; every Ray process starts with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN. Then:

1. requests without the token are refused: a raw POST /api/jobs/ (no header: 401), a
   JobSubmissionClient with a wrong token (403), `ray job submit` from a shell without it;
2. `ray job submit --working-dir REPO -- avray preprocess MANIFEST --out OUT ...` with the token
   (the CLI, tailing the job's logs), then where its decode tasks ran (Ray's state API);
3. a preprocess of a folder with no videos: the job FAILS and its status message says why;
4. `avray train` (1 epoch) and `avray evaluate` as jobs (JobSubmissionClient), where the Train
   workers ran;
5. `serve deploy` of a Serve config with the model just trained, and one request to the service.

Prints one line, RESULT and a JSON object.

    python tests/cluster/jobs_auth.py WORK_DIR
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# what the working_dir upload leaves out (gitignore syntax; Ray also honours .gitignore):
# media, environments and outputs never travel with the code
EXCLUDES = ["demo/", ".venv/", "bench-out/", ".git/", "data/", "*.mp4", "*.parquet", "*.pt"]
CLIP = ["--clip-seconds", "1", "--fps", "4", "--size", "32", "--sample-rate", "8000"]


def wait(client, job_id: str, timeout_s: float = 240.0) -> str:
    """The job's final status (SUCCEEDED, FAILED or STOPPED), polling its status."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(0.5)
    return str(status.value)


def refused_without_token(url: str) -> dict:
    """What the Jobs API answers to a submission with no token and with a wrong one."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    req = urllib.request.Request(f"{url}/api/jobs/", data=json.dumps({"entrypoint": "echo hi"}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(req, timeout=10)
        raw = {"status": 200, "body": ""}
    except urllib.error.HTTPError as e:
        raw = {"status": e.code, "body": e.read().decode()}
    try:
        JobSubmissionClient(url, headers={"Authorization": "Bearer not-the-token"}).submit_job(entrypoint="echo hi")
        wrong = ""
    except AuthenticationError as e:
        wrong = str(e)
    try:  # Serve's REST API (serve deploy / serve status) sits behind the same token
        urllib.request.urlopen(f"{url}/api/serve/applications/", timeout=10)
        serve_api = 200
    except urllib.error.HTTPError as e:
        serve_api = e.code
    return {"no_token": raw, "wrong_token": wrong.splitlines()[0] if wrong else "", "serve_api_no_token": serve_api}


def serve_one_request(url: str, work: Path, env: dict[str, str], timeout_s: float = 180.0) -> dict:
    """`serve deploy` a one-task config (avray's HTTP service with the run's localization model)
    through the dashboard at `url` (with the token), wait until it answers, POST one video."""
    import requests
    import yaml

    from tests.cluster.raystart import RAY, free_port

    port = free_port()
    config = {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": port},
              "applications": [{"name": "avray", "route_prefix": "/", "import_path": "jobs.serve:build_app",
                                "args": {"localization": str(work / "run" / "model.pt")},
                                "deployments": [{"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
                                                {"name": "Localizer", "num_replicas": 1,
                                                 "ray_actor_options": {"num_cpus": 0.25}}]}]}
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    serve = str(Path(RAY).with_name("serve"))
    deploy = subprocess.run([serve, "deploy", str(work / "serve.yaml"), "--address", url], env=env,
                            check=False, capture_output=True, text=True, timeout=120)
    res = {"deploy_rc": deploy.returncode, "status_code": None}
    if deploy.returncode:
        res["deploy_out"] = (deploy.stdout + deploy.stderr)[-2000:]
        return res
    video = work / "media" / "scene_00000.mp4"
    auth = {"Authorization": f"Bearer {os.environ['RAY_AUTH_TOKEN']}"}
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        # the application's state, as `serve status` reads it (Serve's REST API on the dashboard)
        apps = requests.get(f"{url}/api/serve/applications/", headers=auth, timeout=30).json()["applications"]
        res["app_status"] = apps.get("avray", {}).get("status")
        if res["app_status"] == "DEPLOY_FAILED":
            res["app_message"] = apps["avray"].get("message", "")[-2000:]
            return res
        if res["app_status"] != "RUNNING":
            time.sleep(1.0)
            continue
        try:
            with open(video, "rb") as f:
                r = requests.post(f"http://127.0.0.1:{port}/v1/localize", files={"file": (video.name, f, "video/mp4")},
                                  timeout=60)
            if r.status_code == 200:
                d = r.json()
                return {**res, "status_code": 200, "fps": d["fps"], "frames": len(d["frames"])}
            res["status_code"] = r.status_code  # 404 / 503 while the application deploys
        except requests.ConnectionError:
            pass
        time.sleep(1.0)
    return res


def main() -> None:
    token = secrets.token_hex(32)
    # this process is the client: Ray reads RAY_AUTH_MODE once, when ray is first imported
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    from jobs.cli import main as avray
    from jobs.serve import SERVE_ENV
    from tests.cluster.raystart import RAY, RayCLICluster

    work = Path(sys.argv[1])
    # every node in the Serve mode avray serve runs in (as cluster.yaml starts them); `avray` on PATH
    env = {**os.environ, **SERVE_ENV, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # synthetic scenes with boxes (so that evaluate scores localization): 4 videos of 2 s
    assert avray(["synth", "--out", str(work / "media"), "--videos", "4", "--seed", "2", "--seconds", "2",
                  "--size", "32", "--fps", "8", "--sample-rate", "8000"]) == 0
    (work / "empty").mkdir()
    runtime_env = {"working_dir": str(REPO), "excludes": EXCLUDES}
    res: dict = {}
    t0 = time.perf_counter()
    cluster = RayCLICluster(env, workers=[{"num_cpus": 1, "resources": {"decode": 1}},
                                          {"num_cpus": 1, "resources": {"train": 1}}])
    try:
        cluster.start()
        cluster.wait_for_nodes()
        res["cluster_up_s"] = round(time.perf_counter() - t0, 1)
        nodes = {n.node_id: n for n in cluster.alive_nodes()}
        by_resource = {r: [i for i, n in nodes.items() if n.resources_total.get(r)] for r in ("decode", "train")}
        res["nodes"] = {"head_cpus": [n.resources_total.get("CPU", 0) for n in nodes.values() if n.is_head_node],
                        "decode": len(by_resource["decode"]), "train": len(by_resource["train"])}
        url = cluster.dashboard_url
        t = time.perf_counter()
        res["refused"] = refused_without_token(url)
        # `ray job submit` from a shell that lacks the token (a HOME without ~/.ray/auth_token)
        bare = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"HOME": str(work)}
        cli = subprocess.run([RAY, "job", "submit", "--address", url, "--", "echo", "hi"], env=bare,
                             check=False, capture_output=True, text=True, timeout=120)
        res["cli_no_token"] = {"rc": cli.returncode,
                               "authentication_required": "Authentication required" in cli.stdout + cli.stderr}
        res["refused_s"] = round(time.perf_counter() - t, 1)

        # 2. preprocess as a user submits it: the CLI, with the token in its environment, tails the logs
        t = time.perf_counter()
        out = work / "data"
        cli = subprocess.run([RAY, "job", "submit", "--address", url, "--submission-id", "avray-preprocess",
                              "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                              "--", "avray", "preprocess", str(work / "media" / "manifest.jsonl"), "--out", str(out),
                              *CLIP], env=env, check=False, capture_output=True, text=True, cwd=REPO, timeout=300)
        client = JobSubmissionClient(url)
        info = client.get_job_info("avray-preprocess")
        decode_tasks = list_tasks(address=url, filters=[("job_id", "=", info.job_id),
                                                        ("func_or_class_name", "=", "_ingest_batch")], detail=True)
        summary = json.loads((out / "summary.json").read_text())
        res["preprocess"] = {"rc": cli.returncode, "status": str(info.status.value), "seconds": round(time.perf_counter() - t, 1),
                             "cli_says_succeeded": "Job 'avray-preprocess' succeeded" in cli.stdout,
                             "logs_have_summary": "avray preprocess: 4 file(s): 4 ok, 0 failed" in client.get_job_logs("avray-preprocess"),
                             "files_ok": summary["run"]["files_ok"], "clips": summary["out"]["clips"],
                             "decode_task_nodes": sorted({task.node_id == by_resource["decode"][0] for task in decode_tasks}),
                             "decode_tasks": len(decode_tasks)}
        if cli.returncode:
            res["preprocess"]["cli_tail"] = (cli.stdout + cli.stderr)[-3000:]

        # 3. a job that fails: its status says why, without reading the logs
        t = time.perf_counter()
        bad = client.submit_job(entrypoint=f"avray preprocess {work / 'empty'} --out {work / 'bad'}", runtime_env=runtime_env)
        res["bad"] = {"status": wait(client, bad), "message": client.get_job_info(bad).message,
                      "logs": client.get_job_logs(bad)[-2000:], "seconds": round(time.perf_counter() - t, 1)}

        # 4. train then evaluate as jobs
        t = time.perf_counter()
        train = client.submit_job(entrypoint=f"avray train --task localization --data {out / 'clips'} --out {work / 'run'} "
                                  "--epochs 1 --batch-size 2 --val-fraction 0.25",
                                  runtime_env=runtime_env)
        res["train"] = {"status": wait(client, train), "seconds": round(time.perf_counter() - t, 1)}
        logs = client.get_job_logs(train)
        res["train"]["logs_have_epoch"] = "[avray train] epoch 1/1" in logs
        train_id = client.get_job_info(train).job_id
        workers = list_actors(address=url, filters=[("job_id", "=", train_id), ("class_name", "=", "RayTrainWorker")],
                              detail=True)
        res["train"]["worker_on_train_node"] = sorted({a.node_id == by_resource["train"][0] for a in workers})
        res["train"]["workers"] = len(workers)
        if res["train"]["status"] != "SUCCEEDED":
            res["train"]["logs"] = logs[-3000:]
        t = time.perf_counter()
        ev = client.submit_job(entrypoint=f"avray evaluate --task localization --checkpoint {work / 'run' / 'model.pt'} "
                               f"--data {out / 'clips'} --out {work / 'eval'} --batch-size 2 --examples 1",
                               runtime_env=runtime_env)
        res["evaluate"] = {"status": wait(client, ev), "seconds": round(time.perf_counter() - t, 1)}
        metrics = work / "eval" / "metrics.json"
        res["evaluate"]["metrics"] = json.loads(metrics.read_text())["task"] if metrics.is_file() else None
        if res["evaluate"]["status"] != "SUCCEEDED":
            res["evaluate"]["logs"] = client.get_job_logs(ev)[-3000:]

        # 5. `serve deploy` of a Serve config (the model just trained) against the cluster, one request
        t = time.perf_counter()
        res["serve"] = serve_one_request(url, work, env)
        res["serve"]["seconds"] = round(time.perf_counter() - t, 1)
    finally:
        t = time.perf_counter()
        cluster.stop()
        res["stop_s"] = round(time.perf_counter() - t, 1)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
