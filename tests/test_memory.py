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
