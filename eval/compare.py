"""Perplexity of several post-pass methods of one model on one protocol: ``qaft eval``'s table.

The float model is loaded once by the caller; each quantizing method quantizes its own copy
(layer-sequential: under the default quantized propagation each method's later layers calibrate on
its own quantized outputs; under float propagation all methods share one set of statistics), then
all are evaluated on the same windows. ``table`` prints the rows with the share of the RTN → float gap
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

from qaft.core.modules import decoder_layers
from qaft.quant import methods as post
from qaft.quant.config import PostpassConfig, Propagation
from qaft.quant.postpass import Solver, capture_inputs, quantize_models
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
    """``{method: {ppl, seconds, postpass_seconds, eval_seconds, layers}}``; ``model`` itself is never changed.

    What the methods can share, they share: layer 0's inputs on the calibration text (the float model's, for
    every copy), and under ``postpass.propagate: float`` every layer's statistics (one calibration forward per
    layer for all methods; all copies are then held at once and the post-pass seconds are the shared wall split
    evenly). Methods that read no statistics (RTN, LQER) run no calibration forward (their layer reports carry
    no output errors)."""
    resolved = {name: post.resolve(name, postpass) for name in methods}
    quantizing = [n for n, m in resolved.items() if m is not None]
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    inputs = None
    if quantizing and calib is not None:
        first = decoder_layers(model)[1][0]
        inputs = capture_inputs(model, first, calib)
    shared_s = (time.perf_counter() - t0) / max(len(quantizing), 1)
    if postpass.propagate is Propagation.FLOAT and len(quantizing) > 1:
        t0 = time.perf_counter()
        copies = [copy.deepcopy(model) for _ in quantizing]
        reports, _ = quantize_models(copies, [resolved[n] for n in quantizing], calib, scheme, postpass, telemetry=False, inputs=inputs, progress=progress)  # type: ignore[arg-type]
        each = shared_s + (time.perf_counter() - t0) / len(quantizing)
        done = {n: (c, r, each) for n, c, r in zip(quantizing, copies, reports)}
        del copies
    else:
        done = {}
    shared = set(done)
    for name in methods:
        method = resolved[name]
        t0 = time.perf_counter()
        if method is None:
            mm, layers, postpass_s = model, [], 0.0
        elif name in done:
            mm, layers, postpass_s = done.pop(name)
        else:
            mm = copy.deepcopy(model)
            layers = quantize_models([mm], [method], calib, scheme, postpass, telemetry=False, inputs=inputs, progress=progress)[0][0]  # type: ignore[arg-type]
            postpass_s = shared_s + time.perf_counter() - t0
        r = perplexity(mm, eval_ids, protocol.seq_len, protocol.windows, progress=progress)
        results[name] = {
            "ppl": r.ppl,
            "calibration": _calibration(method, postpass, shared=name in shared),
            "seconds": postpass_s + r.seconds,
            "postpass_seconds": postpass_s,
            "eval_seconds": r.seconds,
            "layers": [asdict(x) for x in layers],
        }
        del mm
    return results


def _calibration(method: post.Method | None, postpass: PostpassConfig, *, shared: bool) -> str:
    """How a row was calibrated: ``none`` (float, or a method that reads no statistics), else the propagation."""
    if method is None or not Solver.of(method).reads_statistics:
        return "none"
    return f"{postpass.propagate.value}, shared" if shared else postpass.propagate.value


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
    if "propagation" in p["calibration"]:  # layer by layer; quantized: each method on its own stream, float: one shared set of statistics
        head += f", {p['calibration']['propagation']} propagation, {p['calibration']['forwards']}"
        blind = [m for m, r in report["results"].items() if r.get("calibration") == "none" and m != "fp"]
        if blind:
            head += f" ({', '.join(blind)}: read no statistics, not calibrated)"
    if "export" in report:
        e = report["export"]
        head += f"\nexport rows: {e['path']} ({e['scheme']} + {e['method']}; manifest hashes verified; activations rounded as compressed-tensors does)"
        rc = e.get("runtime_check")
        if rc:
            g = rc["generation"]
            agree = ", ".join(f"{n} {a:.0%}" for n, a in g["agreement"].items())
            rt = rc["runtime"]
            head += (
                f"\n{rt['name']} rows: the same token ids run by {rt['name']} ({rt['binding']}, {rt['threads']} threads); "
                f"greedy {g['new_tokens']} tokens after {g['prompts']} prompts agree with the reload on {agree} of tokens"
            )
    w = max(8, *(len(m) + 2 for m in report["results"]))
    rows = [head, f"{'method':<{w}}{'ppl':>10}{'gap closed':>12}{'seconds':>10}"]
    for m, r in report["results"].items():
        closed = "" if fp is None or rtn is None or m in ("fp", "rtn") or rtn == fp else f"{(rtn - r['ppl']) / (rtn - fp):>11.0%}"
        rows.append(f"{m:<{w}}{r['ppl']:>10.2f}{closed:>12}{r['seconds']:>10.1f}")
    return "\n".join(rows)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
