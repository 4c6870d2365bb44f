"""Peak memory of ``qaft tune`` on SmolLM2-135M against the float model's: each case in a fresh process, peak RSS
read from the kernel's rusage of that child (``os.wait4``), the steps' median seconds from the run's metrics.

Cases: ``float model`` (load it and evaluate the protocol's 8 x 512 test windows: the reference the target
is a multiple of); ``kd`` at the defaults; ``kd + gradient_checkpointing``; ``block``; and with
``--baseline PKG`` the ``kd`` and ``block`` cases once more with another checkout's qaft (its package dir on
PYTHONPATH), so before/after come from one invocation. The post-pass result they all start from is made once (W4
per-channel, whitening, rank 32, calibration 16 x 512 of WikiText-2 valid: ``configs/smollm2-postpass.yaml``).
Tuning reads 2 x 256-token blocks of the calibration text (``tune.*`` defaults), bf16 where the CPU has it.

    .venv/bin/python benchmarks/tune_memory.py --steps 20 [--baseline /path/to/pkg] [--rounds 2 --cases kd "kd, baseline code"]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import train_rows

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"
START = ["postpass.reconstructor=whiten", "postpass.randomized_svd=true"]
FLOAT_MODEL = """
import json, sys
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.config import load_config
cfg = load_config(sys.argv[1], [])
model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=cfg.model.name_or_path))
ids = token_stream(cfg.eval.path, tok, key="eval.path")
print(json.dumps({"ppl": perplexity(model, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl}))
"""


def peak_of(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """``(peak RSS in GiB, wall seconds)`` of one child process; raises with its stderr's tail when it fails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, cwd=ROOT, env=os.environ | (env or {}), stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)  # reaps the child with its own rusage (Popen.wait would not give it)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd[:4])} … failed ({p.returncode}): {err.read().strip()[-2000:]}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="tuning steps per case (block: at least one per layer)")
    ap.add_argument("--baseline", help="another checkout's qaft package dir, for a before/after kd row")
    ap.add_argument("--rounds", type=int, default=1, help="run the cases this many times, interleaved (speed: per-case median over rounds)")
    ap.add_argument("--cases", nargs="+", help="only these cases (default: all)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-tune-memory"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_memory.json"))
    args = ap.parse_args()
    work = Path(args.work)
    common = [*START, f"postpass.output_dir={work / 'quantized'}", f"training.output_dir={work}", "tune.save_steps=0", "tune.logging_steps=1"]
    qaft = [sys.executable, "-m", "qaft"]
    subprocess.run([*qaft, "quantize", str(CONFIG), *common, "--overwrite"], cwd=ROOT, check=True, capture_output=True)
    cases: dict[str, tuple[list[str], dict[str, str]]] = {}
    block = ["tune.objective=block", f"tune.steps={max(args.steps, 30)}"]
    if args.baseline:
        cases["kd, baseline code"] = ([], {"PYTHONPATH": args.baseline})
        cases["block, baseline code"] = (block, {"PYTHONPATH": args.baseline})
    cases |= {
        "kd": ([], {}),
        "kd + gradient_checkpointing": (["tune.gradient_checkpointing=true"], {}),
        "block": (block, {}),
    }
    cases = {k: v for k, v in cases.items() if not args.cases or k in args.cases}
    gib, wall = peak_of([sys.executable, "-c", FLOAT_MODEL, str(CONFIG)])
    report: dict = {"config": str(CONFIG.relative_to(ROOT)), "start": START, "steps": args.steps, "rounds": args.rounds, "baseline": args.baseline}
    report["float model"] = {"peak_rss_gib": gib, "wall_s": wall}
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, (overrides, env) in cases.items():
            run = work / "tune"
            cmd = [*qaft, "tune", str(CONFIG), *common, f"tune.steps={args.steps}", *overrides, "--overwrite"]
            peak, wall = peak_of(cmd, env)
            steps = sorted(r["s_per_step"] for r in train_rows(run)[1:] if "s_per_step" in r)  # the first step warms up kernels
            runs[name].append(
                {"peak_rss_gib": peak, "median_s_per_step": steps[len(steps) // 2], "wall_s": wall, "end_eval_kl": train_rows(run, "eval")[-1]["eval_kl"]}
            )
    print(f"{'case':<30}{'peak RSS GiB':>14}{'x float':>9}{'s/step':>9}{'end KL':>9}")
    print(f"{'float model (load + eval)':<30}{gib:>14.3f}{1.0:>9.2f}")
    for name, rounds in runs.items():
        speed = sorted(r["median_s_per_step"] for r in rounds)
        peak = max(r["peak_rss_gib"] for r in rounds)
        row = {"overrides": cases[name][0], "peak_rss_gib": peak, "ratio_to_float": peak / gib, "median_s_per_step": speed[len(speed) // 2], "rounds": rounds}
        row["end_eval_kl"] = rounds[-1]["end_eval_kl"]
        report[name] = row
        print(f"{name:<30}{peak:>14.3f}{row['ratio_to_float']:>9.2f}{row['median_s_per_step']:>9.2f}{row['end_eval_kl']:>9.4f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
