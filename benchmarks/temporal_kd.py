"""Temporal distillation benchmark on SmolLM2-135M: does a moving (forecast) target help after quantization?

Six runs from ``configs/smollm2-lora.yaml`` (same data, steps and seed; logging every step):
plain LoRA, KL-to-teacher only (``temporal_kd`` with ``weight: 0``), the full temporal method, and
each again with NPFT (its defaults) in front. Each merged model is evaluated on the protocol of
``configs/smollm2-postpass.yaml`` (WikiText-2 test 8 × 512): float, RTN W4 per-channel and L2QER
rank 32; plus step times relative to plain LoRA: mean over all steps, and the median of review steps
(those that add the Conv-LSTM term, where the K snapshot forwards run) and of other steps. Writes
``benchmarks/results/temporal_kd.json``.

    .venv/bin/python benchmarks/temporal_kd.py                    # 300 steps x 6 runs: many hours on 2 cores
    .venv/bin/python benchmarks/temporal_kd.py --steps 60 --phase 10 --review-every 2 --train-set training.per_device_train_batch_size=2  # 45 min
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
from pathlib import Path

from common import add_run_arguments, quantized_ppl, train_rows

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of
from qaft.pipeline.config import load_config
from qaft.trainer.loop import fit

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


def callbacks(specs: list[dict], phase: int, review: int) -> str:
    """The ``callbacks=[...]`` override of one run (JSON is YAML)."""
    return "callbacks=" + json.dumps([{**s, "phase_steps": phase, "review_every": review} if s["name"] == "temporal_kd" else s for s in specs])


def timing(run: Path) -> dict[str, float]:
    """Step times of one run (first step dropped: warm-up), split into review and other steps."""
    rows = [r for r in train_rows(run) if "s_per_step" in r][1:]
    review = [r for r in rows if "loss/temporal_kd/mse" in r]
    other = [r for r in rows if "loss/temporal_kd/mse" not in r]
    out = {"mean_step_s": statistics.fmean(r["s_per_step"] for r in rows), "median_step_s": statistics.median(r["s_per_step"] for r in other)}
    for label, part in (("review", review), ("other", other)):
        extra = [r["temporal_kd/extra_s"] for r in part if "temporal_kd/extra_s" in r]
        if part and label == "review":
            out["median_review_step_s"] = statistics.median(r["s_per_step"] for r in part)
        if extra:
            out[f"median_extra_s_{label}"] = statistics.median(extra)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--phase", type=int, default=25, help="temporal_kd.phase_steps")
    ap.add_argument("--review-every", type=int, default=4, help="temporal_kd.review_every")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    add_run_arguments(ap, ROOT, "temporal_kd")
    args = ap.parse_args()
    work = Path(args.work)
    report = {"train_config": TRAIN.name, "steps": args.steps, "runs": {}}
    for name in args.runs:
        cfg = load_config(
            TRAIN,
            [
                f"training.max_steps={args.steps}",
                "training.save_steps=0",
                "training.logging_steps=1",
                "training.report_to=[]",
                *args.set,
                *args.train_set,
                callbacks(RUNS[name], args.phase, args.review_every),
                f"training.output_dir={work / name}",
            ],
        )
        fit(cfg, overwrite=True)
        report["runs"][name] = timing(work / name)
    ecfg = load_config(EVAL, args.set)
    first = work / args.runs[0] / "final"
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(first)))
    ids, calib = token_stream(ecfg.eval.path, tok, key="eval.path"), calibration_of(ecfg, tok)
    ref = report["runs"].get("lora", {}).get("median_step_s")
    for name, r in report["runs"].items():
        model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(work / name / "final")))
        r["ppl"] = {
            "float": perplexity(model, ids, ecfg.eval.seq_len, ecfg.eval.windows, progress=False).ppl,
            "rtn W4": quantized_ppl(model, calib, ids, EVAL, "rtn", args.set),
            "l2qer W4 r32": quantized_ppl(model, calib, ids, EVAL, "l2qer", ["postpass.rank=32", *args.set]),
        }
        if ref:
            r["step_time_ratio_vs_lora"] = r["median_step_s"] / ref
            r["mean_step_time_ratio_vs_lora"] = r["mean_step_s"] / report["runs"]["lora"]["mean_step_s"]
            if "median_review_step_s" in r:
                r["review_step_time_ratio_vs_lora"] = r["median_review_step_s"] / ref
        print(name, r, flush=True)
    report["protocol"] = (
        f"train {TRAIN.name}, {args.steps} steps, seed 0, phase {args.phase}, review every {args.review_every} | ppl: WikiText-2 test {ecfg.eval.windows} x {ecfg.eval.seq_len}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(report["protocol"])
    nan = float("nan")
    print(f"{'run':<15}{'float':>9}{'rtn W4':>9}{'l2qer':>9}{'mean x':>8}{'other x':>9}{'review x':>10}")
    for name, r in report["runs"].items():
        print(
            f"{name:<15}{r['ppl']['float']:>9.2f}{r['ppl']['rtn W4']:>9.2f}{r['ppl']['l2qer W4 r32']:>9.2f}"
            f"{r.get('mean_step_time_ratio_vs_lora', nan):>8.2f}{r.get('step_time_ratio_vs_lora', nan):>9.2f}{r.get('review_step_time_ratio_vs_lora', nan):>10.2f}"
        )


if __name__ == "__main__":
    main()
