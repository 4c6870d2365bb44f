"""Handing freed host memory back to the system between the phases of a run.

glibc's malloc keeps freed memory in its arenas (after the first large free its mmap threshold rises to
as much as 32 MB, so most tensors then come from the heap), so a phase that allocates and frees hundreds of
MB (loading a model, an evaluation holding full-vocabulary logits) leaves the process that much larger for
the rest of the run, and the next phase's peak stacks on top of it. ``release()`` asks glibc to return
every free page (``malloc_trim(0)``: milliseconds); with another C library it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


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
