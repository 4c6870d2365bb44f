"""NPFT benchmark on SmolLM2-135M: does training with noise on the outliers make RTN work better afterwards?

Runs (same data, steps, seed; ``configs/smollm2-npft.yaml``): (a) the original model, (b) plain LoRA,
(c) NPFT with the authors' ``outlier_range`` noise, (c') NPFT with ``quant_step`` noise (Δ of W4
per-channel), (d) QAT (``callbacks/qat.py``: W4 per-channel fake-quantized forward, straight-through
gradient; the baseline users reach for). Each trained model is merged (``final/``) and evaluated on the protocol of
``configs/smollm2-postpass.yaml`` (WikiText-2 test, 8 × 512 windows; calibration 16 × 512 from
WikiText-2 valid): float ppl, RTN at W4 per-channel, W4 g64 and W3 g64 (symmetric), and for the NPFT
runs L2QER and ASER rank 32 at W4 per-channel, for the original and plain LoRA models GPTQ at W4
per-channel (the other baseline: NPFT claims RTN after NPFT matches it). Also: the Hutchinson trace of the Hessian on NPFT's
outlier set (its last round's mask, the same for every model), and the median step time of each run
with the ratio to plain LoRA. Writes ``benchmarks/results/npft.json``.

    .venv/bin/python benchmarks/npft.py                   # the protocol: 192 steps of 2 x 512 tokens (CPU: ~2 h)
    .venv/bin/python benchmarks/npft.py --steps 64 --train-set data.block_size=256   # ~45 min on 2 cores
    .venv/bin/python benchmarks/npft.py --steps 64 --train-set data.block_size=256 --runs plain qat --merge   # add rows to npft.json
    .venv/bin/python benchmarks/npft.py --steps 48 --timing-only --out benchmarks/results/npft_timing.json  # step times only, quiet machine
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import quantized_ppl, step_times, train_rows

from qaft.callbacks.npft import hessian_trace
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of
from qaft.pipeline.config import load_config
from qaft.trainer.loop import fit

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "smollm2-npft.yaml"
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"
RUNS = {
    "plain": ["callbacks=[]"],
    "npft-range": [],
    "npft-step": ["callbacks.0.noise=quant_step"],
    "qat": ["callbacks=[{name: qat}]"],  # fake-quantized W4 per-channel forward (the config's quant), straight-through
}
SCHEMES = {
    "W4 per-channel": [],
    "W4 g64": ["quant.weight.granularity=group", "quant.weight.group_size=64"],
    "W3 g64": ["quant.weight.bits=3", "quant.weight.granularity=group", "quant.weight.group_size=64"],
}


def outlier_mask(run: Path) -> dict[str, torch.Tensor]:
    """NPFT's last-round outliers, keyed by the merged model's parameter names."""
    (ckpt,) = sorted(run.glob("checkpoint-*"))
    state = torch.load(ckpt / "callbacks" / "rank0.pt", weights_only=False)["npft"]
    return {n.removeprefix("base_model.model.").replace(".base_layer", ""): s["idx"].long() for n, s in state["modules"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="override training.max_steps (the protocol: 192)")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-npft"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "npft.json"))
    ap.add_argument("--probes", type=int, default=16, help="Hutchinson probes for the Hessian trace (2 x 256 calibration tokens)")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra overrides for both configs (e.g. data paths)")
    ap.add_argument("--train-set", nargs="*", default=[], metavar="key=value", help="extra overrides for the training config only")
    ap.add_argument(
        "--evaluate", nargs="+", default=None, metavar="MODEL", help="models to evaluate: original and/or trained runs (default: original + --runs)"
    )
    ap.add_argument("--merge", action="store_true", help="update --out in place: keep its other models' rows and runs")
    ap.add_argument("--timing-only", action="store_true", help="train and report step times only (run it on a quiet machine; e.g. --out .../npft_timing.json)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work)
    steps = [f"training.max_steps={args.steps}", f"training.save_steps={args.steps}", f"training.eval_steps={args.steps}"] if args.steps else []

    old = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else {}
    report: dict = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "train_config": str(TRAIN.relative_to(ROOT)),
        "eval_config": str(EVAL.relative_to(ROOT)),
        "runs": dict(old.get("runs", {})),
    }
    for name in args.runs:
        cfg = load_config(TRAIN, [*steps, *args.set, *args.train_set, *RUNS[name], f"training.output_dir={work / name}"])
        t0 = time.perf_counter()
        fit(cfg, overwrite=True)
        times = step_times(work / name)[1:]  # the first step carries warm-up and round-0 scoring
        noise = [r["npft/noise_s"] for r in train_rows(work / name) if "npft/noise_s" in r]
        report["runs"][name] = {
            "train_seconds": time.perf_counter() - t0,
            "median_step_s": statistics.median(times),
            "steps": len(times) + 1,
            # the callback's own per-step cost, robust to other load on the machine
            "median_noise_s": statistics.median(noise) if noise else 0.0,
        }
        print(f"{name}: trained {cfg.training.max_steps} steps, median step {report['runs'][name]['median_step_s']:.3f} s", flush=True)
    if "plain" in report["runs"]:
        for name, r in report["runs"].items():  # a ratio is only meaningful within one invocation (same machine load)
            if name not in args.runs or "plain" not in args.runs:
                continue
            r["step_time_ratio_vs_plain"] = r["median_step_s"] / report["runs"]["plain"]["median_step_s"]
    if args.timing_only:
        report["command"] = "benchmarks/npft.py " + " ".join(sys.argv[1:])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print_timing(report)
        return

    ecfg = load_config(EVAL, args.set)
    base, tok = load_model_and_tokenizer(ecfg.model)
    ids, calib = token_stream(ecfg.eval.path, tok, key="eval.path"), calibration_of(ecfg, tok)
    report["protocol"] = (
        f"WikiText-2 test {ecfg.eval.windows} x {ecfg.eval.seq_len} | calibration {ecfg.postpass.calibration_samples} x "
        f"{ecfg.postpass.calibration_seq_len} from WikiText-2 valid | seed {load_config(TRAIN).training.seed} | symmetric RTN"
    )
    mask = outlier_mask(work / "npft-range") if (work / "npft-range").is_dir() else None
    hess_batches = [{"input_ids": w[None, :256].to(device), "labels": w[None, :256].to(device)} for w in calib[:2]]
    models = {n: None if n == "original" else work / n / "final" for n in (args.evaluate or ["original", *args.runs])}
    results = {k: dict(v) for k, v in old.get("results", {}).items()}
    for name, path in models.items():
        model = base if path is None else load_model_and_tokenizer(ModelConfig(name_or_path=str(path)))[0]
        model = model.to(device)
        row = {"float": perplexity(model, ids, ecfg.eval.seq_len, ecfg.eval.windows, progress=False).ppl}
        if mask is not None:
            model.train(False)
            est, se = hessian_trace(model, hess_batches, mask, args.probes, torch.Generator().manual_seed(0))
            row["hessian_trace_outliers"], row["hessian_trace_se"] = est, se
        methods = [(s, "rtn") for s in SCHEMES] + ([("W4 per-channel", "l2qer"), ("W4 per-channel", "aser")] if name.startswith("npft") else [])
        methods += [("W4 per-channel", "gptq")] if name in ("original", "plain") else []
        for scheme, method in methods:
            row[f"{method} {scheme}"] = quantized_ppl(model, calib, ids, EVAL, method, [*SCHEMES[scheme], "postpass.rank=32", *args.set])
        results[name] = results.get(name, {}) | row
        print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
        if path is not None:
            del model
    report["results"] = results
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    cols = ["float", *[f"rtn {s}" for s in SCHEMES], "gptq W4 per-channel", "l2qer W4 per-channel", "aser W4 per-channel", "hessian_trace_outliers"]
    print(report["protocol"], "|", report["device"])
    print(f"{'model':<12}" + "".join(f"{c:>24}" for c in cols))
    for name, row in results.items():
        print(f"{name:<12}" + "".join(f"{row[c]:>24.3f}" if c in row else f"{'–':>24}" for c in cols))
    print_timing(report)


def print_timing(report: dict) -> None:
    for name, r in report["runs"].items():
        print(
            f"{name}: median step {r['median_step_s']:.3f} s"
            + (f", {r['step_time_ratio_vs_plain']:.3f}x plain" if "step_time_ratio_vs_plain" in r else "")
            + (
                f"; noise apply/remove {r['median_noise_s'] * 1e3:.1f} ms per step ({r['median_noise_s'] / r['median_step_s']:.2%})"
                if r["median_noise_s"]
                else ""
            )
        )


if __name__ == "__main__":
    main()
