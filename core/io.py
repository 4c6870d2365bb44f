"""Atomic outputs: a folder or file is either complete or absent, never half-written.

Everything qaft writes goes to a temp name beside its destination (``.tmp-<name>``), is fsynced, and
is renamed into place; a rename is atomic on one filesystem, so a kill leaves the previous version
(or nothing) plus a temp folder that ``remove_stale_temps`` deletes on the next run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError

TMP_PREFIX = ".tmp-"


def temp_path(final: Path) -> Path:
    return final.parent / f"{TMP_PREFIX}{final.name}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """fsync every file under ``tmp``, then rename it to ``final`` (replacing an older folder of that name)."""
    for f in tmp.rglob("*") if tmp.is_dir() else [tmp]:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    if final.is_dir() and tmp.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small file (a record, a report) through a fsynced temp file and a rename."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_text(text, encoding="utf-8")
    publish(tmp, path)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A fresh temp folder for ``final``; published when the block ends normally, removed if it raises."""
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | Path) -> None:
    """Delete half-written outputs a killed run left behind."""
    d = Path(folder)
    if d.is_dir():
        for p in d.glob(TMP_PREFIX + "*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def ensure_writable(out: Path, overwrite: bool, key: str) -> None:
    """Refuse to replace a non-empty folder unless asked to (``key`` names the setting that chose it)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{key}: {out} exists and is not a folder; choose another path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{key}: {out} already holds files; pass --overwrite to replace it or choose another folder")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
