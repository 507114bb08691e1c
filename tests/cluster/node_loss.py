"""Run in its own process (tests/test_cluster.py): `avray preprocess` on a real multi-node Ray made
with Ray's own harness (`ray.cluster_utils.Cluster`: a head with no CPUs and two 1-CPU worker
nodes, each its own raylet), with one worker node removed (not gracefully) once the first file
is committed, while the others are in flight. Prints one line, RESULT and a JSON object:
what the run reported and what OUT holds.

    python tests/cluster/node_loss.py MEDIA_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    import pyarrow.parquet as pq
    import ray
    from ray.cluster_utils import Cluster

    from jobs.preprocess import PreprocessConfig, run

    media, out = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    removed = {}

    def lose_a_node() -> None:  # once the first file is committed, while the others are in flight
        clips = out / "clips"
        while not (clips.is_dir() and any(p.suffix == ".parquet" and not p.name.startswith(".") for p in clips.iterdir())):
            time.sleep(0.02)
        removed["after_parts"] = sum(1 for p in clips.iterdir() if not p.name.startswith("."))
        cluster.remove_node(doomed, allow_graceful=False)
        removed["at"] = time.time()

    killer = threading.Thread(target=lose_a_node, daemon=True)
    killer.start()
    try:
        rc = run(PreprocessConfig(inputs=(str(media),), out=str(out), clip_seconds=1.0, fps=4.0, size=32,
                                  sample_rate=8000))
        killer.join(timeout=30)
        deadline = time.time() + 60  # Ray marks the lost node dead once its health checks fail
        while sum(n["Alive"] for n in ray.nodes()) > 2 and time.time() < deadline:
            time.sleep(0.5)
        summary = json.loads((out / "summary.json").read_text())
        table = pq.read_table(out / "clips")
        ids = table.column("clip_id").to_pylist()
        print("RESULT " + json.dumps({"rc": rc, "removed": "at" in removed, "parts_when_removed": removed.get("after_parts"),
                          "files_ok": summary["run"]["files_ok"], "files_failed": summary["run"]["files_failed"],
                          "files_skipped": summary["run"]["files_skipped_done"], "out_clips": summary["out"]["clips"],
                          "clips": len(ids), "unique_clips": len(set(ids)), "clip_ids": sorted(ids),
                          "alive_nodes": sum(n["Alive"] for n in ray.nodes())}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
