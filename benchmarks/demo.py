"""The README demo, timed: ``qaft run configs/demo.yaml --overwrite`` as a user runs it after ``make demo``'s install.

Records the whole command's wall, each stage's seconds (from the run's own stage records) and the report's
perplexity rows, so the README's table and timing are this file's numbers.

    .venv/bin/python benchmarks/demo.py          # ~5 min on 2 cores; never beside another CPU-heavy process
    .venv/bin/python benchmarks/demo.py --seed 1 --out benchmarks/results/demo_seed1.json   # another draw

Writes ``benchmarks/results/demo.json`` (``--out``). ``--seed N`` runs it with ``training.seed=N`` (the fine-tuning's
data order, LoRA initialisation and NPFT's noise; the tuning's data order): the draws behind the README's spread.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["run", "configs/demo.yaml", "--overwrite"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=None, help="training.seed for this draw (default: the config's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo.json"))
    args = ap.parse_args()
    command = COMMAND + ([f"training.seed={args.seed}"] if args.seed is not None else [])
    qaft = Path(sys.executable).parent / "qaft"
    t0 = time.perf_counter()
    subprocess.run([str(qaft), *command], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = ROOT / "runs" / "demo"
    stages = {s: json.loads((out / "stages" / f"{s}.json").read_text())["seconds"] for s in ("train", "quantize", "tune", "export", "eval", "report")}
    ev = json.loads((out / "eval.json").read_text())
    result = {
        "command": "time .venv/bin/qaft " + " ".join(command),
        "seed": args.seed,
        "wall_seconds": round(wall, 1),
        "stage_seconds": {k: round(v) for k, v in stages.items()},
    }
    result |= {"protocol": ev["protocol"], "rows": ev["rows"]}
    path = Path(args.out)
    path.write_text(json.dumps(result, indent=2))
    print(f"qaft {' '.join(command)}: {wall:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + ")")
    for r in ev["rows"]:
        print(f"  {r['model']:<12}{r['method']:<22}{r['scheme'] or '':<22}{r['ppl']:>10.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
