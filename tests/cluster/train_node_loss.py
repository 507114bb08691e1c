"""Run in its own process (tests/test_cluster.py): `avray train` on a real multi-node Ray made with
Ray's own harness (`ray.cluster_utils.Cluster`: a head with no CPUs and two 2-CPU worker nodes),
with the node that hosts the Ray Train worker removed (not gracefully) once Ray Train has
registered the run's first checkpoint. Ray Train (2.58) restarts the worker group on the node that
is left (`FailureConfig(max_failures)`, which avray train sets from --max-failures) and the worker
resumes from the last checkpoint. Prints one line, RESULT and a JSON object.

    python tests/cluster/train_node_loss.py CLIPS_DIR OUT_DIR EPOCHS
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def train_worker_nodes() -> set[str]:
    """Node ids of the alive Ray Train workers (the GCS actor table: needs no dashboard)."""
    import ray._private.state as ray_state

    return {a["Address"]["NodeID"] for a in ray_state.actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE"}


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from jobs.train import TrainConfig, run

    clips, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    ray.init(address=cluster.address, log_to_driver=False)
    lost: dict = {}

    def lose_the_train_workers_node() -> None:
        snapshot = out / "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                registered = json.loads(snapshot.read_text())["checkpoint_results"]
            except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
                registered = []
            nodes = train_worker_nodes()
            if registered and nodes:
                (node,) = [w for w in workers if w.node_id in nodes]
                lost.update(node=node.node_id, checkpoints=len(registered))
                cluster.remove_node(node, allow_graceful=False)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=lose_the_train_workers_node, daemon=True)
    killer.start()
    try:
        rc = run(TrainConfig(task="localization", data=str(clips), out=str(out), epochs=epochs, batch_size=4,
                             val_fraction=0.25, max_failures=1, address=cluster.address))
        killer.join(timeout=30)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        survivor = [w.node_id for w in workers if w.node_id != lost.get("node")]
        print("RESULT " + json.dumps({
            "rc": rc, "lost_node": lost.get("node"), "checkpoints_when_lost": lost.get("checkpoints"),
            "epochs": [r["epoch"] for r in rows], "start_epochs": [r["start_epoch"] for r in rows],
            "model": (out / "model.pt").is_file(), "survivor": survivor,
            "alive": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
