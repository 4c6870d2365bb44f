"""Perplexity of saved post-pass / tuned folders (and the float model) on more WikiText-2 test windows than the protocol's 8.

The protocol's 8 × 512 tokens resolve differences of a few percent; two results closer than that (one
post-pass order against another, a run against its rerun) are compared here on ``--windows`` × 512
tokens (40: ~20k tokens), the protocol's 8 beside them. Folders come as ``label=path`` (``qaft quantize``'s
``quantized/`` or ``qaft tune``'s ``final/``).

    .venv/bin/python benchmarks/folders_ppl.py --windows 40 --out benchmarks/results/tune_held_eval40.json \\
        "old closed=runs/bench-tune-fr/original/w4g64r7/signround-block+whiten/quantized" \\
        "held closed=runs/bench-tune-held/original/w4g64r7/signround-block+whiten/quantized"
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
from pathlib import Path

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.config import load_config
from qaft.quant.store import load_quantized

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", metavar="label=path")
    ap.add_argument("--model", default="smollm2-135m", help="the float model the folders came from")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "smollm2-postpass.yaml", [])
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=args.model))
    ids = token_stream(cfg.eval.path, tok, key="eval.path")
    rows = {}
    for label, path in [("float", None), *(f.split("=", 1) for f in args.folders)]:
        m = model if path is None else load_quantized(path)[0]
        rows[label] = {f"ppl_{n}x{cfg.eval.seq_len}": perplexity(m, ids, cfg.eval.seq_len, n, progress=False).ppl for n in (args.windows, cfg.eval.windows)}
        print(label, {k: round(v, 3) for k, v in rows[label].items()}, flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
