"""Perplexity of several post-pass methods of one model on one protocol: ``qaft eval``'s table.

The float model is loaded once by the caller; each quantizing method quantizes its own copy
(layer-sequential, so each method's later layers calibrate on its own quantized outputs), then all
are evaluated on the same windows. ``table`` prints the rows with the share of the RTN → float gap
each method closes.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qaft.quant import methods as post
from qaft.quant.config import PostpassConfig
from qaft.quant.postpass import quantize_model
from qaft.quant.scheme import QuantScheme

from .config import EvalConfig
from .perplexity import perplexity


def evaluate_methods(
    model: torch.nn.Module,
    eval_ids: torch.Tensor,
    calib: torch.Tensor | None,
    scheme: QuantScheme,
    postpass: PostpassConfig,
    methods: list[str],
    protocol: EvalConfig,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """``{method: {ppl, seconds, postpass_seconds, eval_seconds, layers}}``; ``model`` itself is never changed."""
    results = {}
    for name in methods:
        method = post.resolve(name, postpass)
        t0 = time.perf_counter()
        mm = model if method is None else copy.deepcopy(model)
        layers = [] if method is None else [asdict(r) for r in quantize_model(mm, calib, scheme, postpass, method=method, progress=progress)[0]]
        postpass_s = time.perf_counter() - t0
        r = perplexity(mm, eval_ids, protocol.seq_len, protocol.windows, progress=progress)
        results[name] = {"ppl": r.ppl, "seconds": postpass_s + r.seconds, "postpass_seconds": postpass_s, "eval_seconds": r.seconds, "layers": layers}
        del mm
    return results


def needs_calibration(methods: list[str]) -> bool:
    return any(m != post.FLOAT for m in methods)


def table(report: dict[str, Any]) -> str:
    p = report["protocol"]
    fp = report["results"].get("fp", {}).get("ppl")
    rtn = report["results"].get("rtn", {}).get("ppl")
    factors = f" (int{p['factor_bits']} factors)" if p.get("factor_bits") else ""
    head = (
        f"WikiText-2 perplexity | {p['model']} | {p['scheme']}, rank {p['rank']}{factors} | {p['windows']} windows x {p['seq_len']} tokens | "
        f"calibration {p['calibration']['samples']} x {p['calibration']['seq_len']} from {p['calibration']['path']}"
    )
    if "propagation" in p["calibration"]:  # every row: layer by layer, each method on its own quantized stream
        head += f", {p['calibration']['propagation']} propagation, {p['calibration']['forwards']}"
    if "export" in report:
        e = report["export"]
        head += f"\nexport rows: {e['path']} ({e['scheme']} + {e['method']}; manifest hashes verified; activations rounded as compressed-tensors does)"
    w = max(8, *(len(m) + 2 for m in report["results"]))
    rows = [head, f"{'method':<{w}}{'ppl':>10}{'gap closed':>12}{'seconds':>10}"]
    for m, r in report["results"].items():
        closed = "" if fp is None or rtn is None or m in ("fp", "rtn") or rtn == fp else f"{(rtn - r['ppl']) / (rtn - fp):>11.0%}"
        rows.append(f"{m:<{w}}{r['ppl']:>10.2f}{closed:>12}{r['seconds']:>10.1f}")
    return "\n".join(rows)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
