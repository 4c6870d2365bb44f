"""``manifest.json`` of an export: what was made, from what, with which software, and a sha256 of every file.

``verify`` recomputes the hashes, so a reader (``qaft eval --export``, ``load_export``) knows the
folder is what the export wrote: a truncated download or a hand-edited weight file is named, not
silently evaluated.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

from qaft.core.errors import ExportError
from qaft.core.io import sha256_file

NAME = "manifest.json"
VERSION = 1
LIBRARIES = ("qaft", "torch", "transformers", "peft", "compressed-tensors", "accelerate", "safetensors", "gguf")


def file_hashes(root: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` except the manifest itself."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != NAME}


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    """The qaft source checkout's commit (``+dirty`` with local changes), or None for an installed wheel."""
    src = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def write(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    manifest = {"manifest_version": VERSION, **record, "software": library_versions(), "qaft_git_revision": git_revision(), "files": file_hashes(root)}
    (root / NAME).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify(root: str | Path) -> dict[str, Any]:
    """Load the manifest and check every listed file's sha256 (and that none is missing); returns the manifest."""
    root = Path(root)
    path = root / NAME
    if not path.is_file():
        raise ExportError(f"{root}: no {NAME}; this is not a qaft export (create one with `qaft export CONFIG`)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: unreadable manifest ({e}); re-run `qaft export --overwrite`") from None
    bad = [
        f"{rel} (missing)" if not (root / rel).is_file() else rel
        for rel, digest in files.items()
        if not (root / rel).is_file() or sha256_file(root / rel) != digest
    ]
    if bad:
        raise ExportError(
            f"{root}: {len(bad)} file(s) do not match {NAME}: {', '.join(bad[:3])}; the export was modified or truncated, re-run `qaft export --overwrite`"
        )
    return manifest
