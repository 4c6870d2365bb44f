"""Real non-Llama models read right: transformers' float perplexity vs llama.cpp's on the same windows, with and without BOS.

For each model of ``real_models.MODELS`` (fetched on demand): the protocol of ``configs/smollm2-postpass.yaml``
(WikiText-2 test, 8 × 512 tokens) read by transformers from the de-quantized GGUF (qaft's loader, float32), with the
windows qaft cuts today (BOS + 511 text tokens where the tokenizer adds BOS, ``core.text.windows_of``) and with the
windows it cut before (512 text tokens, no BOS); then llama.cpp itself on the GGUF file as published (Q4_K_M) on
the same BOS windows. The load is right when the two BOS rows agree within 1 % (llama.cpp rounds activations to 8
bits in its quantized products). Writes ``benchmarks/results/user_models.json``.

With ``--run``, then what a user runs on their own model: ``qaft run configs/user-model-gguf.yaml
model.name_or_path=<the GGUF> --overwrite`` in a process of its own (fine-tune → 4.5-bit GGUF budget + whitening →
qaft tune → GGUF model + adapter checked by llama.cpp → perplexity table), recording each stage's seconds and peak
resident memory (the run's own stage records: Linux resets the peak per stage) beside the float32 model's size,
and the run's perplexity rows. Writes ``benchmarks/results/user_runs.json``.

    .venv/bin/python benchmarks/user_models.py --models gemma3-270m qwen2.5-coder-1.5b [--run]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from real_models import MODELS, fetch

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import Stream, token_stream, windows_of
from qaft.eval.perplexity import perplexity
from qaft.pipeline.config import load_config
from qaft.runtimes import llamacpp

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"
RUN = "configs/user-model-gguf.yaml"
STAGES = ("train", "quantize", "tune", "export", "eval", "report")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(name: str, windows: int, seq_len: int) -> dict:
    path = fetch(name)
    eval_path = load_config(EVAL).eval.path
    t0 = time.perf_counter()
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(path)))
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    stream = token_stream(eval_path, tok, key="eval.path")
    with_bos = perplexity(model, stream, seq_len, windows, progress=False)
    without = perplexity(model, Stream(stream.ids), seq_len, windows, progress=False)
    rss = peak_rss_gib()
    del model
    ids = windows_of(stream, seq_len, windows)
    lc = llamacpp.run(path, None, llamacpp.Job(windows=ids.tolist(), prompts=[], new_tokens=0))["rows"]["model"]
    return {
        "label": MODELS[name].label,
        "file": path.name,
        "model_type_parameters": params,
        "bos": stream.bos,
        "windows": windows,
        "seq_len": seq_len,
        "transformers_ppl": with_bos.ppl,
        "transformers_ppl_without_bos": without.ppl,
        "llamacpp_ppl": lc["ppl"],
        "llamacpp_over_transformers": lc["ppl"] / with_bos.ppl,
        "seconds": {"load": load_s, "transformers_window": with_bos.seconds / windows, "llamacpp": lc["seconds"]},
        "peak_rss_gib": rss,
        "float32_gib": 4 * params / 2**30,
    }


def pipeline(name: str, float32_gib: float, start: str | None = None) -> dict:
    """``qaft run`` on the model as a user runs it; each stage's seconds and peak RSS from the run's own records."""
    out = ROOT / "runs" / f"user-{name}"
    command = ["run", RUN, f"model.name_or_path={fetch(name)}", f"training.output_dir={out}", *(["--from", start] if start else ["--overwrite"])]
    t0 = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "qaft"), *command], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name}: qaft run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    records = {s: json.loads((out / "stages" / f"{s}.json").read_text()) for s in STAGES}
    ev = json.loads((out / "eval.json").read_text())
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    return {
        "command": "qaft " + " ".join(command),
        "wall_seconds": time.perf_counter() - t0,
        "float32_gib": float32_gib,
        "stages": {
            s: {
                "seconds": r["seconds"],
                "peak_rss_gib": r["peak_rss_gib"],
                "peak_rss_of": r["peak_rss_of"],
                "peak_over_float32": r["peak_rss_gib"] / float32_gib,
            }
            for s, r in records.items()
        },
        "protocol": ev["protocol"],
        "rows": ev["rows"],
        "export": {"sizes": manifest.get("sizes"), "evaluation": manifest.get("evaluation"), "runtime_check": manifest.get("runtime_check")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "user_models.json"))
    ap.add_argument("--run", action="store_true", help="then qaft run configs/user-model-gguf.yaml on each model")
    ap.add_argument("--skip-float", action="store_true", help="with --run: reuse the float rows already in --out")
    ap.add_argument("--from", dest="start", choices=STAGES, help="with --run: redo the run from this stage (its earlier stages as recorded)")
    ap.add_argument("--runs-out", default=str(ROOT / "benchmarks" / "results" / "user_runs.json"))
    args = ap.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.models:
        if not (args.skip_float and name in results):
            results[name] = r = measure(name, args.windows, args.seq_len)
            out.write_text(json.dumps(results, indent=1))
            print(
                f"{name}: BOS {r['bos']}; transformers {r['transformers_ppl']:.2f} (without BOS {r['transformers_ppl_without_bos']:.2f}), "
                f"llama.cpp {r['llamacpp_ppl']:.2f} ({r['llamacpp_over_transformers']:.4f}x); peak RSS {r['peak_rss_gib']:.2f} GiB, float32 {r['float32_gib']:.2f} GiB"
            )
        if args.run:
            runs_out = Path(args.runs_out)
            runs = json.loads(runs_out.read_text()) if runs_out.is_file() else {}
            runs[name] = r = pipeline(name, results[name]["float32_gib"], args.start)
            runs_out.write_text(json.dumps(runs, indent=1))
            print(f"{name}: {r['command']}: {r['wall_seconds']:.0f} s")
            for stage, v in r["stages"].items():
                print(f"  {stage:<9}{v['seconds']:>7.0f} s  peak RSS {v['peak_rss_gib']:.2f} GiB ({v['peak_over_float32']:.2f}x float32)")
            for row in r["rows"]:
                print(f"  {row['model']:<12}{row['method']:<26}{row['scheme'] or '':<24}{row['ppl']:>9.2f}")


if __name__ == "__main__":
    main()
