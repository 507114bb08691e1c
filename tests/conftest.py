"""Shared fixtures: one session-scoped local Ray, paths to real media."""
from pathlib import Path

import pytest

from jobs.serve import serve_env

serve_env()  # the Serve mode avray serve runs in, set before any test imports ray.serve or starts Ray

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
SHARED_MEDIA = ROOT.parent / "shared" / "media"


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Torch on one thread in the test process: on a shared 2-core box a 2-thread OpenMP pool
    spins at its barriers whenever another process holds a core (a toy training ran 134 s
    instead of 12 s, measured). Ray workers are separate processes and keep Ray's setting."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def ray_local():
    """A 2-CPU local Ray for the whole session, always shut down."""
    import ray

    from jobs.data import keep_idle_workers

    keep_idle_workers()  # as avray train does when it starts Ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a cluster running beside it
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def shared_media() -> Path:
    if not SHARED_MEDIA.is_dir():
        pytest.skip("../shared/media is absent")
    return SHARED_MEDIA
