"""What choosing each Linear's weight format buys at equal bits per weight: RTN, no factors, SmolLM2.

The probe for ``postpass.budget_formats``: every Linear gets one format from a menu (``--menu``: ``w<bits>`` per
channel or ``w<bits>g<group>``, symmetric, fp16 scales), chosen by ``quant.budget.allocate`` (the budget
allocator, over each Linear's (bits, error) points) to minimise the summed output error ``‖X Eᵀ‖²``, weighted as
``postpass.budget_weighting`` would (``--weightings``: ``fisher`` multiplies each by the Linear's mean squared loss
gradient, ``quant/sensitivity.py``). Beside it, each menu format alone (its own bits). Statistics and
sensitivities from the float model (whole-model calibration); protocol of ``configs/smollm2-postpass.yaml``
(calibration 16 × 512 tokens of WikiText-2 validation, WikiText-2 test 8 × 512).

    .venv/bin/python benchmarks/format_menu.py --budgets 4.5 --menu w3g64 w4g64 w5g64 w8     # ~6 min on 2 cores

Writes ``benchmarks/results/format_menu.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
from common import format_fields

from qaft.core import text
from qaft.core.model import load_model_and_tokenizer
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of
from qaft.pipeline.config import load_config
from qaft.quant.budget import Curve, allocate, shape_bits, spent_bpw
from qaft.quant.calibrate import collect
from qaft.quant.grid import quantize_weight
from qaft.quant.scheme import GGUFType, Granularity, WeightFormat, WeightQuant
from qaft.quant.sensitivity import output_sensitivity

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"


def format_of(label: str, base: WeightQuant) -> WeightQuant:
    """``w4`` (per channel) or ``w4g64`` on ``base``'s other settings."""
    fields = format_fields(label)
    if "gguf_type" in fields:
        return WeightQuant(format=WeightFormat.GGUF, gguf_type=GGUFType(fields["gguf_type"]))
    return dataclasses.replace(base, **fields | {"granularity": Granularity(fields["granularity"]), "group_size": fields.get("group_size", base.group_size)})


@torch.no_grad()
def output_error(w: torch.Tensor, spec: WeightQuant, xtx: torch.Tensor) -> float:
    e = (w - quantize_weight(w, spec).dequant).double()
    return (e @ xtx * e).sum().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.5])
    ap.add_argument("--menu", nargs="+", default=["w3g64", "w4g64", "w5g64", "w8"])
    ap.add_argument("--weightings", nargs="+", default=["fisher", "absolute"], choices=["fisher", "absolute"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "format_menu.json"))
    args = ap.parse_args()
    cfg = load_config(CONFIG, [])
    model, tok = load_model_and_tokenizer(cfg.model)
    calib, ids = calibration_of(cfg, tok), text.token_stream(cfg.eval.path, tok, key="eval.path")
    run = lambda m: perplexity(m, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl  # noqa: E731
    fp = run(model)
    linears = cfg.quant.linears(model)
    t0 = time.perf_counter()
    with torch.no_grad(), collect(linears) as stats:
        for seq in calib:
            model(input_ids=seq[None], use_cache=False)
    stats_s, t0 = time.perf_counter() - t0, time.perf_counter()
    sensitivity = output_sensitivity(model, linears, calib)
    sensitivity_s = time.perf_counter() - t0
    menu = {label: format_of(label, cfg.quant.weight) for label in args.menu}
    errors = {n: {f: output_error(lin.weight.data, spec, stats[n].xtx) for f, spec in menu.items()} for n, lin in linears.items()}
    bits = {n: {f: shape_bits(lin.out_features, lin.in_features, spec)[0] for f, spec in menu.items()} for n, lin in linears.items()}

    def quantized(choice: dict[str, str]) -> float:
        m = copy.deepcopy(model)
        with torch.no_grad():
            for n, f in choice.items():
                lin = m.get_submodule(n)
                lin.weight.data = quantize_weight(lin.weight.data, menu[f]).dequant.to(lin.weight.dtype)
        return run(m)

    rows = []
    n_weights = sum(lin.weight.numel() for lin in linears.values())
    print(f"{'budget':>7} {'allocation':<22} {'bits/w':>7} {'ppl':>8} {'vs fp':>7}  formats")
    for f in menu:
        ppl = quantized(dict.fromkeys(linears, f))
        bpw = sum(b[f] for b in bits.values()) / n_weights
        rows.append(
            {"budget_bpw": None, "allocation": f"uniform {f}", "bits_per_weight": bpw, "ppl": ppl, "ratio_to_fp": ppl / fp, "formats": {f: len(linears)}}
        )
        print(f"{'':>7} {'uniform ' + f:<22} {bpw:>7.3f} {ppl:>8.3f} {ppl / fp:>6.3f}x", flush=True)
    for budget in args.budgets:
        for weighting in args.weightings:
            scale = {n: sensitivity[n] if weighting == "fisher" else 1.0 for n in linears}
            layers = [[Curve(n, (errors[n][f] * scale[n],), bits[n][f], 0, lin.weight.numel()) for f in menu] for n, lin in linears.items()]
            choices = allocate(layers, budget)
            choice = {n: list(menu)[f] for n, (f, _) in zip(linears, choices)}
            ppl = quantized(choice)
            counts = {f: sum(c == f for c in choice.values()) for f in menu}
            row = {"budget_bpw": budget, "allocation": f"allocated, {weighting}", "bits_per_weight": spent_bpw(layers, choices), "ppl": ppl}
            rows.append(row | {"ratio_to_fp": ppl / fp, "formats": counts, "choice": choice})
            print(f"{budget:>7.2f} {'allocated, ' + weighting:<22} {row['bits_per_weight']:>7.3f} {ppl:>8.3f} {ppl / fp:>6.3f}x  {counts}", flush=True)
    protocol = {"config": str(CONFIG.relative_to(ROOT)), "fp_ppl": fp, "windows": cfg.eval.windows, "seq_len": cfg.eval.seq_len}
    protocol |= {"calibration": [cfg.postpass.calibration_samples, cfg.postpass.calibration_seq_len], "menu": args.menu}
    protocol |= {"statistics_seconds": stats_s, "sensitivity_seconds": sensitivity_s}
    Path(args.out).write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
