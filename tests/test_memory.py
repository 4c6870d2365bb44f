"""``core.memory.release``: freed heap memory goes back to the system (glibc), which lowers the next phase's peak."""

from __future__ import annotations

import ctypes.util

import pytest
import torch

from qaft.core.memory import release


def _anon_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) / 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.mark.skipif(ctypes.util.find_library("c") is None or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim"), reason="not glibc")
def test_release_returns_freed_heap_pages_that_malloc_would_keep():
    # 100 kB tensors come from the heap (under glibc's smallest mmap threshold); freeing every other one leaves 128 MB
    # of holes between live blocks, which malloc keeps (nothing to coalesce into the heap's top and trim)
    blocks = [torch.ones(25_000) for _ in range(2 * 1280)]
    del blocks[::2]
    before = _anon_mib()
    assert release()
    after = _anon_mib()
    assert before - after > 64, (before, after)  # most of the 128 MB of holes
    del blocks


def test_each_stretch_gets_its_own_peak_not_the_process_peak_before_it():
    """``qaft run`` records a peak per stage: a stage after a large one must not inherit the large one's peak."""
    from qaft.core.memory import Peak

    with Peak() as big:
        block = torch.ones(64 * 2**20)  # 256 MiB, touched
        del block
    with Peak() as small:
        block = torch.ones(2**20)
        del block
    first, second = big.reading(), small.reading()
    assert first["peak_rss_of"] == second["peak_rss_of"] == "stage"  # Linux: the high-water mark resets
    assert first["peak_rss_gib"] - second["peak_rss_gib"] > 0.2, (first, second)
    assert second["peak_rss_gib"] > 0.01  # the process itself, not zero
