"""llama.cpp itself on GGUF files: perplexity on token ids qaft hands over, prompt speed, greedy generation.

llama.cpp comes prebuilt inside the npm package ``node-llama-cpp`` (pinned exactly in this folder's
``package.json`` / ``package-lock.json``; ``make setup`` runs ``npm ci`` here when node and npm exist), so
nothing is compiled and nothing is downloaded at run time. ``ppl.mjs`` does the work in one node
process and answers one JSON object; the same script is usable by hand
(``node runtimes/llamacpp/ppl.mjs MODEL.gguf [ADAPTER.gguf] --text FILE``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qaft.core.errors import ExportError, PreflightError

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "ppl.mjs"
PACKAGE = "node-llama-cpp"


def install_hint() -> str:
    return f"install it with `make setup` (needs node >= 20 and npm), or `npm ci --prefix {HERE}`"


NODE_MAJOR = 20
"""node-llama-cpp 3.21 needs node >= 20."""


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
    """Why llama.cpp cannot run here (no node >= 20, or the npm package not installed), or None when it can."""
    major = node_major()
    if major is None:
        return f"node is not on PATH; {install_hint()}"
    if major < NODE_MAJOR:
        return f"node {major} is too old (node-llama-cpp needs >= {NODE_MAJOR}); {install_hint()}"
    if not (HERE / "node_modules" / PACKAGE / "package.json").is_file():
        return f"the npm package {PACKAGE} is not installed in {HERE}; {install_hint()}"
    return None


def require() -> None:
    why = missing()
    if why:
        raise PreflightError(f"llama.cpp runtime: {why}")


@dataclass(frozen=True)
class Job:
    """What one node process computes: perplexity over ``windows`` (lists of token ids; every next token
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


def run(model: Path, adapter: Path | None, job: Job, *, timeout: float | None = None) -> dict[str, Any]:
    """``{"rows": {"model": row, "model+adapter": row}, "runtime": {...}}``; a row holds ``ppl``, ``nll``, ``tokens``,
    ``windows``, ``seconds``, ``prompt_tokens_per_s`` and ``generations``. A file llama.cpp cannot load is an
    ``ExportError`` naming it (the script's one line), not a crash."""
    require()
    threads = job.threads or len(os.sched_getaffinity(0))
    files = [str(Path(f).resolve()) for f in (model, adapter) if f is not None]  # node runs in HERE: relative paths would miss
    cmd = ["node", str(SCRIPT), *files, "--job", "-", "--threads", str(threads)]
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
        done = subprocess.run(cmd, input=payload, capture_output=True, text=True, timeout=timeout, cwd=HERE)
    except subprocess.TimeoutExpired:
        raise ExportError(f"llama.cpp on {model}: no answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        ours = [ln.removeprefix("ppl.mjs: ") for ln in lines if ln.startswith("ppl.mjs: ")]  # the script's own one-line account
        crash = [ln.strip() for ln in lines if "Error" in ln]  # else node's: its first error line, not the stack below it
        why = (ours or crash or lines[-1:] or [f"exit status {done.returncode}"])[0]
        raise ExportError(f"llama.cpp: {why}")
    return json.loads(done.stdout)
