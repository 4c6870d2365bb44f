"""The README demo, timed: ``qaft run configs/demo.yaml --overwrite`` as a user runs it after ``make demo``'s install.

Records the whole command's wall, each stage's seconds (from the run's own stage records) and the report's
perplexity rows, so the README's table and timing are this file's numbers.

    .venv/bin/python benchmarks/demo.py          # ~5 min on 2 cores; never beside another CPU-heavy process

Writes ``benchmarks/results/demo.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ["run", "configs/demo.yaml", "--overwrite"]


def main() -> None:
    qaft = Path(sys.executable).parent / "qaft"
    t0 = time.perf_counter()
    subprocess.run([str(qaft), *COMMAND], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    out = ROOT / "runs" / "demo"
    stages = {s: json.loads((out / "stages" / f"{s}.json").read_text())["seconds"] for s in ("train", "quantize", "tune", "export", "eval", "report")}
    ev = json.loads((out / "eval.json").read_text())
    result = {"command": "time .venv/bin/qaft " + " ".join(COMMAND), "wall_seconds": round(wall, 1), "stage_seconds": {k: round(v) for k, v in stages.items()}}
    result |= {"protocol": ev["protocol"], "rows": ev["rows"]}
    path = ROOT / "benchmarks" / "results" / "demo.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"qaft {' '.join(COMMAND)}: {wall:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + ")")
    for r in ev["rows"]:
        print(f"  {r['model']:<12}{r['method']:<22}{r['scheme'] or '':<22}{r['ppl']:>10.2f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
