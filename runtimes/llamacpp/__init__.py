"""llama.cpp itself on GGUF files: perplexity on token ids qaft hands over, prompt speed, greedy generation.

llama.cpp comes prebuilt inside the npm package ``node-llama-cpp`` (pinned exactly in this folder's
``package.json`` / ``package-lock.json``; ``make setup`` runs ``npm ci`` here when node >= 20 and npm exist), so
nothing is compiled and nothing is downloaded at run time. qaft calls that package's ``libllama`` directly
(``native.py``, ctypes) in a child process (``worker.py``), which answers one JSON object; node is needed to
install the package, not to run it. By hand:
``python -m qaft.runtimes.llamacpp.worker MODEL.gguf [ADAPTER.gguf] --text FILE [--seq-len 512] [--windows 8]``.

Token ids, not text: qaft tokenizes the protocol windows exactly as for its other rows, so llama.cpp's
perplexity differs from transformers' only by what llama.cpp computes differently (it rounds
activations to 8 bits inside its quantized dot products), never by tokenization.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qaft.core.errors import ExportError, PreflightError

from . import native

HERE = Path(__file__).resolve().parent
PACKAGE = "node-llama-cpp"
NODE_MAJOR = 20
"""node-llama-cpp 3.21 installs with node >= 20."""


def install_hint() -> str:
    return f"install it with `make setup` (needs node >= {NODE_MAJOR} and npm), or `npm ci --prefix {HERE}`"


@functools.cache
def node_major() -> int | None:
    """The major version of the ``node`` on PATH, or None when there is none (or it does not answer)."""
    if shutil.which("node") is None:
        return None
    try:
        out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        return int(out.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def missing() -> str | None:
    """Why llama.cpp cannot run here (the package's prebuilt library is absent), or None when it can."""
    folder = native.bins()
    if folder is None:
        return f"{PACKAGE} ships no prebuilt llama.cpp for this platform ({native.platform_name()})"
    if (folder / native.LIBRARY).is_file():
        return None
    major = node_major()
    if major is None:
        return f"the npm package {PACKAGE} is not installed in {native.modules()} and node is not on PATH to install it; {install_hint()}"
    if major < NODE_MAJOR:
        return f"the npm package {PACKAGE} is not installed in {native.modules()}, and node {major} is too old to install it; {install_hint()}"
    return f"the npm package {PACKAGE} is not installed in {native.modules()}; {install_hint()}"


def require() -> None:
    why = missing()
    if why:
        raise PreflightError(f"llama.cpp runtime: {why}")


@dataclass(frozen=True)
class Job:
    """What one llama.cpp process computes: perplexity over ``windows`` (lists of token ids; every next token
    counted), prompt-processing speed on the first ``speed_tokens`` of the first window, and ``new_tokens``
    greedy tokens after each of ``prompts``; for the model alone and, with an adapter, model + adapter."""

    windows: list[list[int]]
    prompts: list[list[int]]
    new_tokens: int = 16
    speed_tokens: int = 512
    perplexity: bool = True
    """False: no perplexity (the windows only feed the speed measurement)."""
    token_nll: bool = False
    """Also return each window's per-token negative log-likelihoods (``token_nll``)."""
    threads: int | None = None


def default_threads() -> int:
    """``OMP_NUM_THREADS`` where set (the threads this process may use: pytest-xdist workers get 1 each), else every core
    this process may run on. llama.cpp's threads spin while they wait: more of them than free cores costs ~20x."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0))


def run(model: Path, adapter: Path | None, job: Job, *, timeout: float | None = None) -> dict[str, Any]:
    """``{"rows": {"model": row, "model+adapter": row}, "runtime": {...}}``; a row holds ``ppl``, ``nll``, ``tokens``,
    ``windows``, ``seconds``, ``prompt_tokens_per_s`` and ``generations``. A file llama.cpp cannot load is an
    ``ExportError`` naming it (the script's one line), not a crash."""
    require()
    threads = job.threads or default_threads()
    files = [str(Path(f).resolve()) for f in (model, adapter) if f is not None]
    cmd = [sys.executable, "-m", "qaft.runtimes.llamacpp.worker", *files, "--threads", str(threads)]
    payload = json.dumps(
        {
            "windows": job.windows,
            "prompts": job.prompts,
            "new_tokens": job.new_tokens,
            "speed_tokens": job.speed_tokens,
            "perplexity": job.perplexity,
            "token_nll": job.token_nll,
        }
    )
    try:
        done = subprocess.run(cmd, input=payload, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ExportError(f"llama.cpp on {model}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        ours = [ln.removeprefix("worker: ") for ln in lines if ln.startswith("worker: ")]  # the worker's own one-line account
        if ours:
            why = ours[0]
        elif done.returncode < 0:  # a crash inside llama.cpp ends the worker by a signal
            why = f"ended by signal {-done.returncode}"
        else:
            why = lines[-1] if lines else f"exit status {done.returncode}"
        raise ExportError(f"llama.cpp: {why}")
    return json.loads(done.stdout)
