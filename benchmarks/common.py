"""Pieces the training benchmarks share: step times from a run's metrics, post-quantization perplexity."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import run_method
from qaft.pipeline.config import load_config
from qaft.trainer.loop import fit

GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")


def format_fields(label: str) -> dict:
    """``w4`` (per channel), ``w4g64`` or a GGUF type (``Q4_0``) → the ``quant.weight`` fields it names (the
    benchmarks' menus of formats)."""
    if label in GGUF_TYPES:
        return {"format": "gguf", "gguf_type": label}
    m = re.fullmatch(r"w(\d+)(?:g(\d+))?", label)
    if not m:
        raise SystemExit(f"--menu: {label!r} is not w<bits>, w<bits>g<group> (e.g. w4g64) or a GGUF type ({', '.join(GGUF_TYPES)})")
    return {"bits": int(m[1]), "granularity": "group", "group_size": int(m[2])} if m[2] else {"bits": int(m[1]), "granularity": "channel"}


def train_rows(run: Path, event: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["event"] == event]


def step_times(run: Path) -> list[float]:
    """Seconds per optimizer step, one per logged step (log every step for this to be per step)."""
    return [r["s_per_step"] for r in train_rows(run) if "s_per_step" in r]


def quantized_ppl(model: torch.nn.Module, calib: torch.Tensor, ids: torch.Tensor, config: Path, method: str, overrides: list[str]) -> float:
    """Perplexity of a quantized copy of ``model`` (``method`` under ``config`` + ``overrides``) on the config's eval protocol."""
    cfg = load_config(config, overrides)
    m = copy.deepcopy(model)
    run_method(m, calib[:1] if method == "rtn" else calib, cfg, method, progress=False)  # RTN reads no statistics
    return perplexity(m, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl


def add_run_arguments(ap, root: Path, name: str) -> None:
    """``--work`` (training runs), ``--out`` (result JSON), ``--set`` (overrides for every config), ``--train-set`` (training only)."""
    ap.add_argument("--work", default=str(root / "runs" / f"bench-{name}"))
    ap.add_argument("--out", default=str(root / "benchmarks" / "results" / f"{name}.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for both configs (e.g. data paths)")
    ap.add_argument("--train-set", nargs="*", default=[], metavar="key=value", help="overrides for the training config only")


def fine_tune(config: Path, steps: int, overrides: list[str], callbacks: list[dict], out: Path) -> str:
    """A training run of ``config`` (``steps`` steps, no checkpoints or trackers, ``callbacks``) into ``out``; its ``final/``."""
    cfg = load_config(
        config,
        [
            f"training.max_steps={steps}",
            "training.save_steps=0",
            "training.report_to=[]",
            *overrides,
            "callbacks=" + json.dumps(callbacks),
            f"training.output_dir={out}",
        ],
    )
    return str(fit(cfg, overwrite=True))
