"""Atomic outputs: a folder or file is either complete or absent, never half-written.

Everything qaft writes goes to a temp name beside its destination (``.tmp-<name>``), is fsynced, and
is renamed into place; a rename is atomic on one filesystem, so a kill leaves the previous version
(or nothing) plus a temp folder that ``remove_stale_temps`` deletes on the next run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import CheckpointError, EnvironmentProblem, QaftError

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
    with writing(path.name, path.parent, cleanup=tmp):
        tmp.write_text(text, encoding="utf-8")
        publish(tmp, path)


@contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A fresh temp folder for ``final``; published when the block ends normally, removed if it raises (a write the
    machine refused becomes one ``EnvironmentProblem`` line, see ``writing``)."""
    tmp = temp_path(final)
    with writing(final.name, final.parent, cleanup=tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        publish(tmp, final)


WRITE_FAULTS = {
    errno.ENOSPC: ("the disk is full", "free space there (or write elsewhere) and run the command again"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota (or write elsewhere) and run the command again"),
    errno.EROFS: ("the filesystem is read-only", "choose a writable folder"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
}
"""errno → (what happened, what to do) for writes that fail because of the machine."""

_MESSAGES = {"No space left on device": errno.ENOSPC, "StorageFull": errno.ENOSPC, "os error 28": errno.ENOSPC}
_MESSAGES |= {"Disk quota exceeded": errno.EDQUOT, "Read-only file system": errno.EROFS, "os error 30": errno.EROFS}
_MESSAGES |= {"Permission denied": errno.EACCES, "os error 13": errno.EACCES}
"""Libraries that lose the errno (safetensors' Rust writer, huggingface's) still keep the OS's words in the message."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def free_bytes(path: str | Path) -> int | None:
    """Free space on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def folder_size(path: str | Path) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (p.stat().st_size if p.is_file() else 0)


def human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def environment_problem(
    exc: BaseException, *, what: str, dest: str | Path | None = None, needed: int | None = None, kept: str | None = None, doing: str = "writing"
) -> EnvironmentProblem | None:
    """The one line for a write the machine refused (full disk, quota, read-only, permission), or None when
    ``exc`` is not that (a bug: let it surface). torch's zip writer reports a failed write as a bare RuntimeError
    ("unexpected pos", "file write failed"): it counts as a full disk when less than ``needed`` (at least 1 MB)
    is free where it was writing."""
    code = None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in WRITE_FAULTS:
            code, dest = e.errno, dest or e.filename
            break
        code = next((c for words, c in _MESSAGES.items() if words in str(e)), None)
        if code is not None:
            break
    free = None if dest is None else free_bytes(dest)
    if code is None:
        torch_writer = any(isinstance(e, RuntimeError) and ("inline_container" in str(e) or "PytorchStreamWriter" in str(e)) for e in _chain(exc))
        if not (torch_writer and free is not None and free < max(needed or 0, 1 << 20)):
            return None
        code = errno.ENOSPC
    cause, fix = WRITE_FAULTS[code]
    space = ""
    if code in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        space = f" ({human(free)} free" + (f", about {human(needed)} needed" if needed else "") + ")"
    where = f" in {dest}" if dest is not None else ""
    return EnvironmentProblem(f"{doing} {what}{where} failed: {cause}{space}; {kept + '; ' if kept else ''}{fix}")


@contextmanager
def writing(what: str, dest: str | Path, *, cleanup: Path | None = None, needed: int | None = None, kept: Callable[[], str] | None = None) -> Iterator[None]:
    """Around a write of ``what`` into the folder ``dest``: if it raises, the half-written ``cleanup`` is removed,
    and a failure the machine caused becomes one ``EnvironmentProblem`` line (``kept()``: what is still intact)."""
    try:
        yield
    except BaseException as e:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True) if cleanup.is_dir() else cleanup.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, QaftError):
            problem = environment_problem(e, what=what, dest=dest, needed=needed, kept=kept() if kept else None)
            if problem is not None:
                raise problem from None
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


def damaged_safetensors(folder: str | Path) -> list[tuple[Path, str]]:
    """Each ``*.safetensors`` file under ``folder`` that safetensors cannot open (a header cut short, data ending
    before the header says it does), with the library's reason: the cause behind a loader's generic failure."""
    from safetensors import safe_open

    bad = []
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as handle:
                list(handle.keys())
        except Exception as e:  # SafetensorError, OSError
            bad.append((f, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]))
    return bad


def utf8_problem(path: str | Path) -> str | None:
    """Where ``path`` stops being UTF-8 (byte offset, line, the bytes), or None when it decodes."""
    raw = Path(path).read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return f"byte {e.start} (line {line}) is {raw[e.start : e.end]!r}, not UTF-8"
    return None
