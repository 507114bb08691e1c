"""A real multi-node Ray on this machine, started the way a user starts one: `ray start --head`
and `ray start --address` per worker node, each its own raylet with its own ports and temp dir,
all bound to 127.0.0.1, with the environment given (e.g. Ray's token authentication:
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, read by every Ray process at start).

Every node runs `ray start --block` in its own session, so that stopping it stops exactly the
processes it started: SIGTERM (ray drains and kills its children), then SIGKILL to its process
group. Never `ray stop`, which would stop every Ray on the machine (the test session's own).

    with RayCLICluster(env, workers=[{"num_cpus": 1, "resources": {"decode": 1}}]) as c:
        JobSubmissionClient(c.dashboard_url)...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


def node_ports() -> list[str]:
    """`ray start` options giving a node its own ports (nodes on one machine must not share the
    defaults, e.g. the dashboard agent's 52365)."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]


class RayCLICluster:
    """A head with `head_cpus` CPUs (0: it runs no tasks) and the dashboard / Jobs API on
    127.0.0.1, plus one worker node per dict of `workers` ({"num_cpus": n, "resources": {...}})."""

    def __init__(self, env: dict[str, str], workers: list[dict[str, Any]], head_cpus: int = 0,
                 timeout_s: float = 60.0):
        self.env, self.workers, self.head_cpus, self.timeout_s = env, workers, head_cpus, timeout_s
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="avr")  # short: Ray's Unix socket paths must stay < 108 chars
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def _start(self, name: str, args: list[str]) -> None:
        cmd = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir",
               os.path.join(self.tmp, name), "--disable-usage-stats", *node_ports(), *args]
        with open(os.path.join(self.tmp, f"{name}.log"), "w") as log:  # the child keeps its own copy
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start(self) -> RayCLICluster:
        self._start("head", ["--head", "--port", str(self.gcs_port), "--num-cpus", str(self.head_cpus),
                             "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(self.dashboard_port),
                             "--ray-client-server-port", str(free_port())])
        self._wait(lambda: _listening(self.gcs_port), "the head's GCS")
        for i, w in enumerate(self.workers):  # they connect while the head's dashboard starts
            self._start(f"w{i}", ["--address", self.address, "--num-cpus", str(w.get("num_cpus", 1)),
                                  "--resources", json.dumps(w.get("resources", {}))])
        self._wait(lambda: self._get("/api/gcs_healthz") is not None, "the head's dashboard")
        return self

    def alive_nodes(self) -> list[Any]:
        """The alive nodes (Ray's state API through the dashboard; this process's environment
        must carry the token when the cluster has token authentication)."""
        from ray.util.state import list_nodes

        return list_nodes(address=self.dashboard_url, filters=[("state", "=", "ALIVE")], detail=True)

    def wait_for_nodes(self) -> None:
        self._wait(lambda: len(self.alive_nodes()) == 1 + len(self.workers), "every node")

    def _get(self, path: str, token: str | None = None) -> str | None:
        req = urllib.request.Request(self.dashboard_url + path,
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.read().decode()
        except OSError:
            return None

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + self.timeout_s
        while not ready():
            dead = [p.args for p in self.procs if p.poll() is not None]
            if dead or time.time() > deadline:
                raise RuntimeError(f"{what} did not come up in {self.timeout_s:.0f} s (exited: {dead}); "
                                   f"logs in {self.tmp}")
            time.sleep(0.25)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the nodes started here: SIGTERM to each `ray start` (which stops its node's
        processes), after `grace_s` SIGKILL to their process groups (a head with Serve drains its
        proxies for longer than a test needs)."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for p in reversed(self.procs):
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # its group: the processes this `ray start` spawned
            except ProcessLookupError:
                pass
            p.wait()
        if not os.environ.get("AVRAY_KEEP_RAY_LOGS"):  # set it to keep the nodes' logs for a post-mortem
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> RayCLICluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
