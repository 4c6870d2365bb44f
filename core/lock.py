"""One writer per output folder: an advisory lock beside it, held for the whole command.

Two ``qaft train`` processes on one ``training.output_dir`` would interleave checkpoint writes and one's
rotation would delete what the other is about to read; nothing in the files themselves can prevent it.
``filelock``'s Unix lock is ``flock(2)``: the kernel drops it when the holder exits in any way (``kill -9``
included), so a stale lock never blocks a later run. The lock file sits beside the folder (``.<name>.lock``),
not in it, so ``--overwrite`` and the "folder already holds files" check never see it; a small JSON beside
it names the holder (pid, command, start) for the refusal message. Under a multi-process launch only the
main process (``RANK`` 0) takes it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from .errors import EnvironmentProblem

HELD = "QAFT_HELD_LOCKS"
"""Folders this process tree already holds (``os.pathsep``-separated): a child process launched by a holder
(``accelerate launch`` of ``qaft train`` by ``qaft run``) does not wait for its own parent."""


def lock_path(folder: Path) -> Path:
    folder = folder.absolute()
    return folder.parent / f".{folder.name}.lock"


def _info_path(folder: Path) -> Path:
    """Who holds the lock: written by the holder after it took the lock (the lock file itself stays empty)."""
    return lock_path(folder).with_suffix(".lock.json")


def _holder(folder: Path) -> str:
    try:
        info = json.loads(_info_path(folder).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} ({info['command']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def output_lock(folder: str | Path, key: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; ``key`` names the setting that chose the folder (for the message)."""
    folder = Path(folder).absolute()
    held = [p for p in os.environ.get(HELD, "").split(os.pathsep) if p]
    if int(os.environ.get("RANK", "0")) != 0 or str(folder) in held:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(folder)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise EnvironmentProblem(
            f"{key}: {folder} is in use by another qaft process, {_holder(folder)}; wait for it to finish, stop it, or write to another folder"
        ) from None
    info = _info_path(folder)
    info.write_text(json.dumps({"pid": os.getpid(), "command": " ".join(["qaft", *sys.argv[1:]])[:300], "since": time.time()}))
    os.environ[HELD] = os.pathsep.join([*held, str(folder)])
    try:
        yield
    finally:
        os.environ[HELD] = os.pathsep.join(held)
        info.unlink(missing_ok=True)
        lock.release()


@contextmanager
def output_locks(folders: list[tuple[str | Path, str]]) -> Iterator[None]:
    """Every ``(folder, key)`` locked for the block, in a fixed order (no two commands can wait on each other)."""
    with ExitStack() as stack:
        seen: set[Path] = set()
        for folder, key in sorted(folders, key=lambda f: str(Path(f[0]).absolute())):
            if Path(folder).absolute() not in seen:
                seen.add(Path(folder).absolute())
                stack.enter_context(output_lock(folder, key))
        yield
