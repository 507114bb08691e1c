"""cluster.yaml is a valid Ray cluster launcher config (checked against Ray's own schema)."""
import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_ray_schema():
    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    assert set(cfg["available_node_types"]) == {"head", "cpu_decode", "gpu_train"}
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert any("constraints.txt" in c for c in cfg["setup_commands"])


def test_cluster_nodes_start_ray_in_avray_serves_serve_mode():
    from jobs.serve import SERVE_ENV

    cfg = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    env = " ".join(f"{k}={v}" for k, v in SERVE_ENV.items())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg[key] if "ray start" in c]
    assert len(starts) == 2
    assert all(c.startswith(env + " ray start") for c in starts), starts
