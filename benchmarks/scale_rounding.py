"""How an int grid's stored scale is rounded, and what it costs: RTN perplexity per rule, on the post-pass protocol.

compressed-tensors files hold the scales in fp16 (what the bits budget counts). A loader de-quantizes either in
the scales' fp16 (compressed-tensors' own de-compression, transformers' de-compressing route) or in float32
(transformers' compressed route upcasts the scales first), so the weights agree across loaders only if every
``(code − zero) · scale`` is exact in fp16: the scale may keep only fp16's 11 significant bits less the codes'.
Rules compared (``exact, nearest`` is the shipped one, ``grid.stored_scale``):

- ``float32``: the raw ``max|w| / 7`` (what qaft used before; the files would need float32 scales),
- ``fp16``: nearest fp16 (the products are not exact: loaders differ),
- ``exact, up``: rounded up to the kept bits (never clips),
- ``exact, nearest``: to the nearest value with the kept bits, up only where nearest would clip the extreme weight
  (asymmetric grids: up, as their zero point's rounding can already take the last half step).

    .venv/bin/python benchmarks/scale_rounding.py        # ~6 min on 2 cores

Protocol of configs/smollm2-postpass.yaml (SmolLM2-135M-Instruct, RTN without factors, WikiText-2 test 8 x 512).
Writes ``benchmarks/results/scale_rounding.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
from pathlib import Path

import torch
from common import format_fields

import qaft.quant.grid as grid
from qaft.core import text
from qaft.core.model import load_model_and_tokenizer
from qaft.eval.perplexity import perplexity
from qaft.pipeline.config import load_config
from qaft.quant.postpass import quantize_model
from qaft.quant.scheme import WeightQuant

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"
SHIPPED = grid.stored_scale


def round_up(scale: torch.Tensor, spec: WeightQuant) -> torch.Tensor:
    mag = scale.abs().clamp(min=2.0**grid.FP16_TINY_EXP)
    ulp = grid.kept_ulp(mag, spec)
    return (torch.ceil(mag / ulp) * ulp).copysign(scale)


RULES = {
    "float32": lambda scale, spec: scale,
    "fp16": lambda scale, spec: scale.half().to(scale.dtype),
    "exact, up": round_up,
    "exact, nearest": SHIPPED,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["w4", "w4g64", "w3g64", "w5g64", "w8"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_rounding.json"))
    args = ap.parse_args()
    cfg = load_config(CONFIG, ["postpass.reconstructor=none"])
    model, tok = load_model_and_tokenizer(cfg.model)
    ids = text.token_stream(cfg.eval.path, tok, key="eval.path")
    fp = perplexity(model, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
    rows = []
    print(f"float {fp:.3f}\n{'format':<22} " + " ".join(f"{r:>15}" for r in RULES))
    for label in args.formats:
        fields = format_fields(label)
        c = load_config(CONFIG, ["postpass.reconstructor=none", *(f"quant.weight.{k}={v}" for k, v in fields.items())])
        row = {"format": c.quant.weight.label}
        for name, rule in RULES.items():
            grid.stored_scale = rule
            try:
                m = copy.deepcopy(model)
                quantize_model(m, torch.empty(0, 1, dtype=torch.long), c.quant, c.postpass, telemetry=False, progress=False)
                row[name] = perplexity(m, ids, c.eval.seq_len, c.eval.windows, progress=False).ppl
            finally:
                grid.stored_scale = SHIPPED
        rows.append(row)
        print(f"{row['format']:<22} " + " ".join(f"{row[r]:>15.3f}" for r in RULES), flush=True)
    protocol = {"config": "configs/smollm2-postpass.yaml", "method": "RTN, no factors", "windows": cfg.eval.windows, "seq_len": cfg.eval.seq_len, "fp_ppl": fp}
    Path(args.out).write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
