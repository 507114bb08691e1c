"""Where avray's stages run on a cluster: the custom resources they ask for when the cluster offers them.

A cluster marks its node types with custom resources (cluster.yaml: `decode` on the CPU decode
workers, `train` on the GPU workers; `ray start --resources '{"decode": 1}'` by hand). When some
alive node, or a node type the autoscaler may launch, has the resource, preprocess's decode tasks
ask for `decode` and Ray Train's workers for `train`, so they run only there; a cluster (or a
laptop's local Ray) without it runs them on plain CPUs/GPUs as before. The amount asked is a token (MARKER): the resource only says *where*,
the CPUs (and GPUs) a task asks for still say *how many* run at once on a node, so a node's
`decode: 1` admits as many decode tasks as it has CPUs.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

DECODE = "decode"  # preprocess's decode tasks (pipelines.ingest)
TRAIN = "train"  # Ray Train workers (jobs/train.py)
MARKER = 0.001  # the amount asked: a placement label, never the limit (Ray's resource precision is 1e-4)


def offered(resource: str, nodes: list[dict[str, Any]] | None = None,
            groups: list[dict[str, Any]] | None = None) -> bool:
    """Whether the connected cluster offers `resource`: some alive node has it (`nodes`, as
    `ray.nodes()` lists them), or some node type the autoscaler may launch does (`groups`: node
    types as {"resources": {...}, "max_count": n}, from the cluster config the autoscaler publishes
    in the GCS, which Ray Data's autoscaling reads too; -1: no limit). The second matters for
    cluster.yaml's `min_workers: 0`: before the first decode node starts, asking for `decode` is
    what makes the autoscaler start one (asking for CPUs alone could start a GPU node). Without
    arguments both are read from Ray."""
    if nodes is None:
        import ray

        nodes, groups = ray.nodes(), autoscaler_node_types()
    if any(n.get("Alive") and n.get("Resources", {}).get(resource, 0) > 0 for n in nodes):
        return True
    return any(g.get("max_count", 0) != 0 and g.get("resources", {}).get(resource, 0) > 0 for g in groups or ())


def autoscaler_node_types() -> list[dict[str, Any]]:
    """The node types of the cluster config the autoscaler published (`ray._private.state`, as
    Ray Data's autoscaler reads it): [{"resources", "max_count"}]; [] when none is published (a
    local Ray, `ray start` by hand) or it cannot be read."""
    try:
        import ray._private.state

        config = ray._private.state.state.get_cluster_config()
    except Exception as e:  # a private API: never let it break a job
        log.debug("no autoscaler cluster config: %s", e)
        return []
    if config is None:
        return []
    return [{"resources": dict(g.resources), "max_count": int(g.max_count)} for g in config.node_group_configs]


def stage_resources(resource: str, nodes: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """The custom resources a stage asks for: {resource: MARKER} when the cluster offers
    `resource`, else {} (plain CPUs). E.g. stage_resources("decode") on a cluster.yaml cluster
    -> {"decode": 0.001}; on a local Ray -> {}."""
    if offered(resource, nodes):
        log.info("the cluster offers %r: that stage runs on the nodes that have it", resource)
        return {resource: MARKER}
    return {}


def train_worker_resources(use_gpu: bool, nodes: list[dict[str, Any]] | None = None) -> dict[str, float] | None:
    """`ScalingConfig.resources_per_worker` for avray train: one GPU (use_gpu) or one CPU per
    worker, plus `train` when the cluster offers it; None (Ray Train's default, the same
    CPU/GPU) when it does not."""
    extra = stage_resources(TRAIN, nodes)
    if not extra:
        return None
    return {("GPU" if use_gpu else "CPU"): 1.0, **extra}
