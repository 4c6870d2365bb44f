"""How ``qaft tune``'s defaults were chosen: finished tuning runs, compared on their held-out validation KL.

Collects ``LABEL=TUNE_DIR`` runs made with ``qaft tune configs/smollm2-postpass.yaml ...`` (the commands
are in docs/methods/tune.md): from each run its own record (``final/qaft_quant.json``: start, tuning
config, steps) and its ``eval`` rows (``eval_kl`` / ``eval_ppl`` on the last 5 % of WikiText-2 valid,
which neither calibration nor tuning read: what the defaults are chosen on), plus the WikiText-2 test
perplexity on the protocol (8 × 512), informational only. Writes ``benchmarks/results/tune_selection.json``.

    .venv/bin/python benchmarks/tune_selection.py whiten=runs/sel/w/tune l2qer=runs/sel/l2/tune ...
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
from pathlib import Path

from common import train_rows

from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.config import load_config
from qaft.quant.store import META, load_quantized

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=TUNE_DIR")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_selection.json"))
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="overrides for the eval config (e.g. data paths)")
    args = ap.parse_args()
    cfg = load_config(EVAL, args.set)
    report: dict = {"eval": {"path": cfg.eval.path, "windows": cfg.eval.windows, "seq_len": cfg.eval.seq_len}, "runs": {}}
    for label, folder in (r.split("=", 1) for r in args.runs):
        run = Path(folder)
        evals = train_rows(run, "eval")
        steps = [r["s_per_step"] for r in train_rows(run) if "s_per_step" in r]
        row = {
            "finished": (run / "final" / META).is_file(),
            "median_s_per_step": sorted(steps)[len(steps) // 2] if steps else None,
            "valid": [{k: r[k] for k in ("step", "eval_kl", "eval_ppl", "eval_teacher_ppl")} for r in evals],
        }
        if row["finished"]:  # a run stopped early (a clearly worse setting) keeps only its validation rows
            meta = json.loads((run / "final" / META).read_text())
            model, tok, _ = load_quantized(run / "final")
            ids = token_stream(cfg.eval.path, tok, key="eval.path")
            row |= {"start": meta["tune"]["start"], "tune": meta["tune"]["config"], "steps": meta["tune"]["steps"], "rank": meta["rank"]}
            row["test_ppl"] = perplexity(model, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
        report["runs"][label] = row
        test = f"test ppl {row['test_ppl']:.2f}" if row["finished"] else "stopped early"
        print(f"{label:<28} valid KL {evals[0]['eval_kl']:.4f} -> {evals[-1]['eval_kl']:.4f} at step {evals[-1]['step']}  {test}", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
