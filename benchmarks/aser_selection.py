"""Choose ASER's smoothing defaults on the validation split (never the test split).

Loads the model once, then for each candidate (whitening-only and several smoothing settings) runs
the post-pass of ``configs/smollm2-postpass.yaml`` with the given scheme override (default W4A8)
and measures perplexity on 8 × 512 windows of WikiText-2 *validation* taken after character
200,000 (the calibration uses the first 16 × 512 tokens, ~40,000 characters, so they never overlap).
Prints a table and writes ``benchmarks/results/aser_selection_valid.json``.

    .venv/bin/python benchmarks/aser_selection.py                     # ~12 min on 2 cores
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from qaft.core.model import load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of, run_method
from qaft.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CANDIDATES = [
    ("whiten", []),
    ("aser", ["postpass.reconstructor={name: aser, outliers: 2}"]),
    ("aser", ["postpass.reconstructor={name: aser, outliers: 4}"]),
    ("aser", ["postpass.reconstructor={name: aser, outliers: 8, alpha: 0.3}"]),
    ("aser", ["postpass.reconstructor={name: aser, outliers: null, extract: false}"]),
    ("aser", ["postpass.reconstructor={name: aser, outliers: 4, extract: false}"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", nargs="*", default=["quant.activation.bits=8"], help="overrides for the scheme (default W4A8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "aser_selection_valid.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        held_out = Path(tmp) / "valid_tail.txt"
        held_out.write_text(VALID.read_text()[200_000:])
        base = [*args.scheme, f"eval.path={held_out}"]
        cfg0 = load_config(ROOT / "configs" / "smollm2-postpass.yaml", base)
        model, tok = load_model_and_tokenizer(cfg0.model)
        ids, calib = token_stream(held_out, tok, key="eval.path"), calibration_of(cfg0, tok)
        rows = []
        for method, overrides in CANDIDATES:
            cfg = load_config(ROOT / "configs" / "smollm2-postpass.yaml", base + overrides)
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            run_method(m, calib, cfg, method, progress=False)
            r = perplexity(m, ids, 512, 8, progress=False)
            rows.append({"method": method, "overrides": overrides, "valid_ppl": r.ppl, "seconds": time.perf_counter() - t0})
            print(f"{method:<7} {' '.join(overrides) or '-':<70} valid ppl {r.ppl:8.3f}", flush=True)
    protocol = (
        f"{cfg0.quant.label}, rank {cfg0.postpass.rank}, calibration 16 x 512 from the start of WikiText-2 valid; "
        "ppl on 8 x 512 windows of WikiText-2 valid after character 200000"
    )
    Path(args.out).write_text(json.dumps({"protocol": protocol, "results": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
