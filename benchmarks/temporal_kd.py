"""Temporal distillation benchmark on SmolLM2-135M: does a moving (forecast) target help after quantization?

Six runs from ``configs/smollm2-lora.yaml`` (same data, steps and seed; logging every step):
plain LoRA, KL-to-teacher only (``temporal_kd`` with ``weight: 0``), the full temporal method, and
each again with NPFT (its defaults) in front. Each merged model is evaluated on the protocol of
``configs/smollm2-postpass.yaml`` (WikiText-2 test 8 × 512): float, RTN W4 per-channel and L2QER
rank 32; plus the median step time of each run relative to plain LoRA. Writes
``benchmarks/results/temporal_kd.json``.

    .venv/bin/python benchmarks/temporal_kd.py                    # 300 steps x 6 runs: many hours on 2 cores
    .venv/bin/python benchmarks/temporal_kd.py --steps 100 --train-set callbacks.0.phase_steps=10
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
from pathlib import Path

from qaft.quant.compare import calibration_ids
from qaft.quant.evaluate import perplexity, token_stream
from qaft.trainer.config import ModelConfig, load_config
from qaft.trainer.loop import fit
from qaft.trainer.model import load_model_and_tokenizer

from common import add_run_arguments, quantized_ppl, step_times

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "smollm2-lora.yaml"
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"
NPFT = {"name": "npft", "hessian_probes": 0}
TKD = {"name": "temporal_kd", "layers": [-1]}
RUNS = {
    "lora": [],
    "kl": [{**TKD, "weight": 0}],
    "temporal": [TKD],
    "npft+lora": [NPFT],
    "npft+kl": [NPFT, {**TKD, "weight": 0}],
    "npft+temporal": [NPFT, TKD],
}


def callbacks(specs: list[dict], phase: int) -> str:
    """The ``callbacks=[...]`` override of one run (JSON is YAML)."""
    return "callbacks=" + json.dumps([{**s, "phase_steps": phase} if s["name"] == "temporal_kd" else s for s in specs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--phase", type=int, default=25, help="temporal_kd.phase_steps")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    add_run_arguments(ap, ROOT, "temporal_kd")
    args = ap.parse_args()
    work = Path(args.work)
    report = {"train_config": TRAIN.name, "steps": args.steps, "runs": {}}
    for name in args.runs:
        cfg = load_config(TRAIN, [f"training.max_steps={args.steps}", "training.save_steps=0", "training.logging_steps=1", "training.report_to=[]",
                                  *args.set, *args.train_set, callbacks(RUNS[name], args.phase), f"training.output_dir={work / name}"])
        fit(cfg, overwrite=True)
        report["runs"][name] = {"median_step_s": statistics.median(step_times(work / name)[1:])}
    ecfg = load_config(EVAL, args.set)
    first = work / args.runs[0] / "final"
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(first)))
    ids, calib = token_stream(ecfg.eval.path, tok), calibration_ids(ecfg, tok)
    ref = report["runs"].get("lora", {}).get("median_step_s")
    for name, r in report["runs"].items():
        model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(work / name / "final")))
        r["ppl"] = {"float": perplexity(model, ids, ecfg.eval.seq_len, ecfg.eval.windows, progress=False).ppl,
                    "rtn W4": quantized_ppl(model, calib, ids, EVAL, "rtn", args.set),
                    "l2qer W4 r32": quantized_ppl(model, calib, ids, EVAL, "l2qer", ["postpass.rank=32", *args.set])}
        if ref:
            r["step_time_ratio_vs_lora"] = r["median_step_s"] / ref
        print(name, r, flush=True)
    report["protocol"] = f"train {TRAIN.name}, {args.steps} steps, seed 0, phase {args.phase} | ppl: WikiText-2 test {ecfg.eval.windows} x {ecfg.eval.seq_len}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(report["protocol"])
    print(f"{'run':<15}{'float':>9}{'rtn W4':>9}{'l2qer':>9}{'step x':>8}")
    for name, r in report["runs"].items():
        print(f"{name:<15}{r['ppl']['float']:>9.2f}{r['ppl']['rtn W4']:>9.2f}{r['ppl']['l2qer W4 r32']:>9.2f}{r.get('step_time_ratio_vs_lora', float('nan')):>8.2f}")


if __name__ == "__main__":
    main()
