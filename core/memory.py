"""Handing freed host memory back to the system between the phases of a run.

glibc's malloc keeps freed memory in its arenas (after the first large free its mmap threshold rises to
as much as 32 MB, so most tensors then come from the heap), so a phase that allocates and frees hundreds of
MB (loading a model, an evaluation holding full-vocabulary logits) leaves the process that much larger for
the rest of the run, and the next phase's peak stacks on top of it. ``release()`` asks glibc to return
every free page (``malloc_trim(0)``: milliseconds); with another C library it does nothing.

``Peak`` measures the peak resident memory of a stretch of work (``qaft run`` records it per stage). Linux resets
the process's high-water mark when 5 is written to ``/proc/self/clear_refs``, so each stretch gets its own peak;
elsewhere only the process's peak since it started is known, and the reading says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import resource
import sys
from functools import cache
from pathlib import Path

_PROC = Path("/proc/self")


@cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to ask
        return None


def release() -> bool:
    """Return the heap's free pages to the system; ``True`` where the C library can (glibc)."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True


class Peak:
    """``with Peak() as p: ...`` then ``p.reading()``: ``{"peak_rss_gib": ..., "peak_rss_of": "stage" | "process"}``
    (``process``: the peak since the process started, where the high-water mark cannot be reset)."""

    def __enter__(self) -> Peak:
        release()  # what the previous stretch freed is not this one's
        try:
            (_PROC / "clear_refs").write_text("5")
            self.own = _hwm_kib() is not None
        except OSError:
            self.own = False
        return self

    def __exit__(self, *exc) -> None:
        self.kib = (_hwm_kib() if self.own else None) or _process_peak_kib()

    def reading(self) -> dict[str, float | str]:
        return {"peak_rss_gib": self.kib / 2**20, "peak_rss_of": "stage" if self.own else "process"}


def _hwm_kib() -> int | None:
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", (_PROC / "status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) if found else None


def _process_peak_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
