"""jobs/placement.py: avray's stages ask for `decode` / `train` only when some alive node offers them
(the multi-node placement itself: tests/test_cluster.py)."""

import pytest

from jobs.placement import MARKER, offered, stage_resources, train_worker_resources


def node(alive: bool = True, **resources: float) -> dict:
    """A row as `ray.nodes()` lists it."""
    return {"Alive": alive, "Resources": {"CPU": 4.0, "memory": 1e9, **resources}}


CLUSTER = [node(CPU=0.0), node(decode=1.0), node(decode=1.0), node(train=1.0, GPU=1.0)]
LAPTOP = [node()]


def test_a_stage_asks_for_its_resource_only_where_the_cluster_offers_it():
    assert stage_resources("decode", CLUSTER) == {"decode": MARKER} == {"decode": 0.001}
    assert stage_resources("train", CLUSTER) == {"train": 0.001}
    assert stage_resources("decode", LAPTOP) == {} and stage_resources("train", LAPTOP) == {}


def test_dead_nodes_and_zero_amounts_do_not_offer_a_resource():
    assert not offered("decode", [node(), node(alive=False, decode=1.0)])
    assert not offered("decode", [node(decode=0.0)])
    assert offered("decode", [node(alive=False, decode=1.0), node(decode=2.0)])


@pytest.mark.parametrize("use_gpu, expected", [(False, {"CPU": 1.0, "train": 0.001}), (True, {"GPU": 1.0, "train": 0.001})])
def test_train_workers_ask_for_train_besides_their_cpu_or_gpu(use_gpu, expected):
    assert train_worker_resources(use_gpu, CLUSTER) == expected
    assert train_worker_resources(use_gpu, LAPTOP) is None  # Ray Train's default: 1 CPU (or 1 GPU)



def test_a_node_type_the_autoscaler_may_launch_offers_its_resource_before_any_such_node_is_up():
    """cluster.yaml's decode workers start at min_workers 0: only the head (0 CPUs) is alive."""
    head = [node(CPU=0.0)]
    types = [{"resources": {"CPU": 0.0}, "max_count": 0},
             {"resources": {"CPU": 8.0, "decode": 1.0}, "max_count": 16},
             {"resources": {"CPU": 8.0, "GPU": 1.0, "train": 1.0}, "max_count": -1}]  # -1: no limit
    assert offered("decode", head, types) and offered("train", head, types)
    # avray train's --use-gpu auto asks the same question of GPUs: the GPU type may be launched
    assert offered("GPU", head, types) and not offered("GPU", head, types[:2])
    assert not offered("decode", head, [{"resources": {"decode": 1.0}, "max_count": 0}])  # never launched
    assert not offered("decode", head, [{"resources": {"CPU": 8.0}, "max_count": 4}])
    assert not offered("decode", head)


def test_a_local_ray_publishes_no_autoscaler_node_types(ray_local):
    from jobs.placement import autoscaler_node_types

    assert autoscaler_node_types() == [] and not offered("decode") and stage_resources("decode") == {}
