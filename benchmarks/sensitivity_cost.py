"""What ``budget_weighting: fisher`` costs: the sensitivity pass (one forward + backward per calibration sequence)
against a plain forward of the same sequences, on SmolLM2-135M with the post-pass protocol's calibration
(16 x 512 tokens of WikiText-2 validation), bf16 autocast as ``postpass.bf16: auto`` picks on a CPU with bf16 units.

    .venv/bin/python benchmarks/sensitivity_cost.py        # ~1 min on 2 cores

Writes ``benchmarks/results/sensitivity_cost.json``; compare with a post-pass's seconds in ``results/budget_cost.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import torch

from qaft.core.hardware import resolve_bf16
from qaft.core.model import load_model_and_tokenizer
from qaft.pipeline.commands import calibration_of
from qaft.pipeline.config import load_config
from qaft.quant.sensitivity import output_sensitivity

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sensitivity_cost.json"))
    args = ap.parse_args()
    cfg = load_config(CONFIG, [])
    model, tok = load_model_and_tokenizer(cfg.model)
    calib = calibration_of(cfg, tok)
    bf16 = resolve_bf16(cfg.postpass.bf16)[0]
    linears = cfg.quant.linears(model)
    output_sensitivity(model, linears, calib[:1], bf16=bf16)  # warm-up: the first backward allocates
    rows = []
    for n in args.samples:
        t0 = time.perf_counter()
        output_sensitivity(model, linears, calib[:n], bf16=bf16)
        rows.append({"sequences": n, "fisher_seconds": time.perf_counter() - t0})
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t0 = time.perf_counter()
        for seq in calib:
            model(input_ids=seq[None], use_cache=False)
        forward = time.perf_counter() - t0
    for r in rows:
        print(f"{r['sequences']:>3} sequences: {r['fisher_seconds']:6.2f} s (forward alone of all {len(calib)}: {forward:.2f} s)")
    protocol = {"config": "configs/smollm2-postpass.yaml", "calibration": list(calib.shape), "bf16": bf16, "threads": torch.get_num_threads()}
    Path(args.out).write_text(json.dumps({"protocol": protocol, "forward_seconds_all": forward, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
