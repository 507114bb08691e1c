"""Process-wide memory allocator setting for the CPU processes that run models (embed actors,
serving replicas): one function, no imports beyond ctypes."""

from __future__ import annotations


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Let glibc's malloc keep freed memory for the next batch instead of giving it back to the
    kernel (M_MMAP_THRESHOLD and M_TRIM_THRESHOLD = `limit`); False where there is no glibc.

    By default an allocation over the mmap threshold (128 kB, adapting up to 32 MB) is its own
    mmap and freed memory at the top of the heap beyond the trim threshold is returned at once, so
    each forward pass's activations (tensors of up to 13 MB for a 64-clip batch of the tiny preset
    at 32 px) are page-faulted in, zeroed by the kernel, again at every batch. Measured on 2 cores,
    that batch: 25,000 page faults (100 MB) a batch without this, about 170 with it; the forward pass alone
    at 385 clips/s on 1 thread and 700 on 2 without, 530 and 960 with. Memory stays bounded by a
    batch's peak, which the process holds anyway while it runs a batch. A serving replica's
    localization forward pass of one request (tiny preset, 1 thread, in a Ray task of 0.25 CPU):
    61-65 ms without, 45-49 ms with (three runs; benchmarks/allocator.py)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))
