"""MAT benchmark on SmolLM2-135M: full LoRA vs MAT at equal steps and at equal wall time.

Training: ``configs/smollm2-lora.yaml`` (WikiText-2 validation, LoRA r 8 on every Linear, 4 × 256
tokens, seed 0), logging every step; MAT with its defaults (8 probe blocks, warm-up 100, interval
50, ``ratio_of_mean`` alpha 1). Runs: ``lora`` (full LoRA), ``mat`` (same steps), ``mat-time``
(as many MAT steps as fit in the wall time ``lora`` took). Reports the final eval loss of each,
the share of head-steps updated, the training-time ratio (sum of step times), the cost of one λmax recomputation in
training steps, and perplexity after RTN W4 per-channel and L2QER rank 32 on the protocol of
``configs/smollm2-postpass.yaml`` (WikiText-2 test, 8 × 512). Writes ``benchmarks/results/mat.json``
and ``mat_eval_loss.png`` (eval loss vs step for each run).

    .venv/bin/python benchmarks/mat.py                                  # 300 steps: ~2 h on 2 cores
    .venv/bin/python benchmarks/mat.py --steps 120 --train-set callbacks.0.warmup_steps=40 callbacks.0.interval=20
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time
from pathlib import Path

from common import add_run_arguments, quantized_ppl, step_times, train_rows

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of
from qaft.pipeline.config import load_config
from qaft.trainer.loop import fit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "smollm2-lora.yaml"
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"


def run(name: str, work: Path, overrides: list[str]) -> dict:
    cfg = load_config(TRAIN, [*overrides, f"training.output_dir={work / name}", "training.logging_steps=1", "training.report_to=[]"])
    t0 = time.perf_counter()
    fit(cfg, overwrite=True)
    rows, evals = train_rows(work / name), train_rows(work / name, "eval")
    active = [r.get("mat/active_fraction", 1.0) for r in rows]
    lam = [r for r in rows if "mat/lambda_seconds" in r]
    return {
        "steps": cfg.training.max_steps,
        "wall_seconds": time.perf_counter() - t0,
        "train_seconds": sum(step_times(work / name)),
        "median_step_s": statistics.median(step_times(work / name)[1:]),
        "head_steps_updated": sum(active) / len(active),
        "eval": [(r["step"], r["eval_loss"]) for r in evals],
        "final_eval_loss": evals[-1]["eval_loss"],
        "lambda_seconds_per_recompute": lam[-1]["mat/lambda_seconds"] / len(lam) if lam else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    add_run_arguments(ap, ROOT, "mat")
    args = ap.parse_args()
    work = Path(args.work)
    base = [f"training.max_steps={args.steps}", f"training.eval_steps={max(1, args.steps // 6)}", "training.save_steps=0", *args.set]
    mat = ["callbacks=[{name: mat}]"]
    report = {"train_config": str(TRAIN.relative_to(ROOT)), "runs": {}}
    report["runs"]["lora"] = run("lora", work, [*base, *args.train_set, "callbacks=[]"])
    report["runs"]["mat"] = run("mat", work, [*base, *mat, *args.train_set])
    equal = max(1, round(args.steps * report["runs"]["lora"]["train_seconds"] / report["runs"]["mat"]["train_seconds"]))
    report["runs"]["mat-time"] = run("mat-time", work, [*base, *mat, *args.train_set, f"training.max_steps={equal}"])
    lora = report["runs"]["lora"]
    for r in report["runs"].values():
        r["wall_ratio_vs_lora"] = r["train_seconds"] / lora["train_seconds"]  # optimizer steps only: no model load, no final save
        r["eval_loss_vs_lora"] = r["final_eval_loss"] / lora["final_eval_loss"] - 1
        if r["lambda_seconds_per_recompute"]:
            r["recompute_in_lora_steps"] = r["lambda_seconds_per_recompute"] / lora["median_step_s"]

    ecfg = load_config(EVAL, args.set)
    _, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(work / "lora" / "final")))
    ids, calib = token_stream(ecfg.eval.path, tok, key="eval.path"), calibration_of(ecfg, tok)
    for name, r in report["runs"].items():
        model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=str(work / name / "final")))
        r["ppl"] = {
            "float": perplexity(model, ids, ecfg.eval.seq_len, ecfg.eval.windows, progress=False).ppl,
            "rtn W4": quantized_ppl(model, calib, ids, EVAL, "rtn", args.set),
            "l2qer W4 r32": quantized_ppl(model, calib, ids, EVAL, "l2qer", ["postpass.rank=32", *args.set]),
        }
        print(name, r["ppl"], flush=True)
    report["protocol"] = f"train {TRAIN.name}, {args.steps} steps, seed 0 | ppl: WikiText-2 test {ecfg.eval.windows} x {ecfg.eval.seq_len}"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        for name, r in report["runs"].items():
            ax.plot(*zip(*r["eval"]), marker="o", label=f"{name} ({r['head_steps_updated']:.0%} head-steps)")
        ax.set_xlabel("step")
        ax.set_ylabel("eval loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(args.out).with_name("mat_eval_loss.png"), dpi=120)
    except ImportError:
        pass
    print(report["protocol"])
    print(f"{'run':<10}{'steps':>7}{'eval loss':>11}{'vs lora':>9}{'head-steps':>12}{'wall x':>8}{'rtn W4':>9}{'l2qer':>9}")
    for name, r in report["runs"].items():
        print(
            f"{name:<10}{r['steps']:>7}{r['final_eval_loss']:>11.4f}{r['eval_loss_vs_lora']:>+9.2%}{r['head_steps_updated']:>12.0%}"
            f"{r['wall_ratio_vs_lora']:>8.2f}{r['ppl']['rtn W4']:>9.2f}{r['ppl']['l2qer W4 r32']:>9.2f}"
        )
    if report["runs"]["mat"].get("recompute_in_lora_steps"):
        print(f"one λmax recomputation = {report['runs']['mat']['recompute_in_lora_steps']:.2f} LoRA steps")


if __name__ == "__main__":
    main()
