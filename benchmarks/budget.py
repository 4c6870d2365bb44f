"""Equal bits per weight, uniform rank vs allocated rank (``postpass.budget_bpw``), on the post-pass protocol.

For each budget B (bits per quantized weight: codes, fp16 scales, fp16 factors, as ``quant/budget.py`` and the
export count them): the largest uniform rank that fits B, and the allocator's per-layer ranks (cap
``--cap``) at B, each with the given reconstructors; perplexity on the protocol of configs/smollm2-postpass.yaml
(W4 per-channel sym, calibration 16 x 512 tokens of WikiText-2 validation, WikiText-2 test 8 x 512).

    .venv/bin/python benchmarks/budget.py --budgets 4.5 5.0 --methods whiten       # ~8 min on 2 cores

Writes ``benchmarks/results/budget.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import collections
import copy
import json
import time
from pathlib import Path

from common import format_fields

from qaft.core import text
from qaft.core.hardware import precision
from qaft.core.model import load_model_and_tokenizer
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of
from qaft.pipeline.config import load_config
from qaft.quant.budget import model_bpw, shape_bits
from qaft.quant.postpass import quantize_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.5, 5.0, 5.5])
    ap.add_argument("--methods", nargs="+", default=["whiten", "l2qer"])
    ap.add_argument("--weightings", nargs="+", default=["fisher", "absolute", "relative"], help="postpass.budget_weighting values to allocate with")
    ap.add_argument("--cap", type=int, default=128, help="largest rank the allocator may give one Linear")
    ap.add_argument("--menu", nargs="*", default=[], help="with formats too: postpass.budget_formats as w<bits>[g<group>] labels (e.g. w3g64 w8)")
    ap.add_argument(
        "--kinds", nargs="+", default=["uniform", "ranks", "formats"], choices=["uniform", "ranks", "formats"], help="which rows to run per budget and method"
    )
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for every row, e.g. quant.weight.format=gguf quant.weight.gguf_type=Q4_0")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "budget.json"))
    args = ap.parse_args()
    base_cfg = load_config(CONFIG, args.set)
    model, tok = load_model_and_tokenizer(base_cfg.model)
    calib, ids = calibration_of(base_cfg, tok), text.token_stream(base_cfg.eval.path, tok, key="eval.path")
    fp = perplexity(model, ids, base_cfg.eval.seq_len, base_cfg.eval.windows, progress=False).ppl
    shapes = [(m.out_features, m.in_features) for m in base_cfg.quant.linears(model).values()]
    bits = [shape_bits(*s, base_cfg.quant.weight) for s in shapes]
    n, base, per = (sum(b[i] for b in bits) for i in (2, 0, 1))
    menu = json.dumps([format_fields(label) for label in args.menu])
    rows = []
    print(f"{'budget':>7} {'method':<8} {'allocation':<16} {'bits/w':>7} {'ranks (min/median/max)':>24} {'ppl':>8} {'vs fp':>7} {'s':>6}")
    for budget in args.budgets:
        uniform = int((budget * n - base) // per)
        for method in args.methods:
            allocated = {
                f"alloc {w}": [f"postpass.rank={args.cap}", f"postpass.budget_bpw={budget}", f"postpass.budget_weighting={w}"] for w in args.weightings
            }
            runs = {"uniform": [f"postpass.rank={uniform}"]} if "uniform" in args.kinds else {}
            runs |= allocated if "ranks" in args.kinds else {}
            runs |= {f"{k} + formats": [*o, f"postpass.budget_formats={menu}"] for k, o in allocated.items()} if args.menu and "formats" in args.kinds else {}
            for kind, overrides in runs.items():
                cfg = load_config(CONFIG, [*args.set, f"postpass.reconstructor={method}", *overrides])
                m = copy.deepcopy(model)
                t0 = time.perf_counter()
                reports, _ = quantize_model(m, calib, cfg.quant, cfg.postpass, progress=False)
                seconds = time.perf_counter() - t0
                ppl = perplexity(m, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
                ranks = sorted(r.rank for r in reports)
                row = {"budget_bpw": budget, "method": method, "allocation": kind, "bits_per_weight": model_bpw(m), "ppl": ppl, "ratio_to_fp": ppl / fp}
                row |= {"ranks": [r.rank for r in reports], "rank_min": ranks[0], "rank_median": ranks[len(ranks) // 2], "rank_max": ranks[-1]}
                row |= {"postpass_seconds": seconds, "formats": dict(collections.Counter(r.weight_format or cfg.quant.weight.label for r in reports))}
                rows.append(row)
                print(
                    f"{budget:>7.2f} {method:<8} {kind:<16} {row['bits_per_weight']:>7.3f} {f'{ranks[0]}/{ranks[len(ranks) // 2]}/{ranks[-1]}':>24} "
                    f"{ppl:>8.3f} {ppl / fp:>6.3f}x {seconds:>6.0f}",
                    flush=True,
                )
                del m
    protocol = {"config": str(CONFIG.relative_to(ROOT)), "scheme": base_cfg.quant.label, "fp_ppl": fp, "cap": args.cap, "windows": base_cfg.eval.windows}
    protocol |= {
        "menu": args.menu,
        "sensitivity_samples": base_cfg.postpass.budget_sensitivity_samples,
        "overrides": args.set,
        "seq_len": base_cfg.eval.seq_len,
        "calibration": [base_cfg.postpass.calibration_samples, base_cfg.postpass.calibration_seq_len],
        "calibration_precision": precision(base_cfg.postpass.bf16),
    }
    Path(args.out).write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
