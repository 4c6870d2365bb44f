"""GGUF Q4_0 benchmark on SmolLM2-135M: original vs LoRA vs NPFT trained for the Q4_0 grid (and the original's
result tuned by ``qaft tune``), each exported to llama.cpp files, reloaded through transformers' GGUF loader
and run by llama.cpp itself.

Per model: ``qaft quantize`` (RTN on the Q4_0 grid, L2QER rank 32 on its error) → ``qaft export``
(``model-Q4_0.gguf`` + ``adapter-lowrank.gguf``) → perplexity of the reloaded files (the model alone,
and with the adapter's factors read back from the GGUF), beside the same scheme evaluated in memory
by qaft (``rtn`` and ``l2qer`` rows: what ``qaft eval`` reports), and file sizes; then the same files
in llama.cpp (``export.runtime_check: required``; node-llama-cpp's prebuilt CPU binary, 2 threads) on the
same token ids: perplexity with and without the adapter, prompt processing tokens/s of one 512-token
window with and without it (measured in the same process, so the ratio holds on a noisy machine),
and greedy agreement (16 tokens after 4 prompts) with transformers' reload. Training: both
runs from ``configs/smollm2-lora.yaml`` with the same data, steps and seed; NPFT with
``noise: quant_step`` under ``quant: {weight: {format: gguf, gguf_type: Q4_0}}``, so its noise is
the Q4_0 rounding error. Protocol of ``configs/smollm2-postpass.yaml`` (WikiText-2 test 8 × 512,
calibration 16 × 512 of WikiText-2 valid). Writes ``benchmarks/results/gguf_export.json``.

    .venv/bin/python benchmarks/gguf_export.py --steps 60 --tune-steps 20 --train-set training.per_device_train_batch_size=2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
from pathlib import Path

from common import add_run_arguments, fine_tune, quantized_ppl

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.export.gguffile import ADAPTER_FILE
from qaft.export.ggufformat import load_gguf
from qaft.export.llamacpp import ROWS
from qaft.pipeline.commands import calibration_of, export_run, quantize_and_save, tune_run
from qaft.pipeline.config import load_config
from qaft.runtimes import llamacpp

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "smollm2-lora.yaml"
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"
Q4_0 = ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"]
RUNS = {"lora": [], "npft": [{"name": "npft", "noise": "quant_step", "hessian_probes": 0}]}


def speed(report_path: Path, rounds: int) -> None:
    """Re-measure llama.cpp's prompt processing on the written exports, alone on the machine: ``rounds`` node
    processes per export, each timing model and model + adapter (best of 3 each) on the first 512-token protocol
    window; the median per row replaces ``prompt_tokens_per_s`` (the export stage measured it beside other work)."""
    report = json.loads(report_path.read_text())
    for name, r in report["results"].items():
        out = Path(r["export"])
        _, tok = load_gguf(out)
        ids = token_stream(load_config(EVAL).eval.path, tok, key="eval.path").ids[:512].tolist()
        samples: dict[str, list[float]] = {}
        for _ in range(rounds):
            rows = llamacpp.run(out / "model-Q4_0.gguf", out / ADAPTER_FILE, llamacpp.Job(windows=[ids], prompts=[], perplexity=False))["rows"]
            for key, row in rows.items():
                samples.setdefault(ROWS[key], []).append(row["prompt_tokens_per_s"])
        r["prompt_tokens_per_s"] = {k: statistics.median(v) for k, v in samples.items()}
        r["prompt_tokens_per_s_samples"] = samples
        print(name, {k: round(v) for k, v in r["prompt_tokens_per_s"].items()}, flush=True)
    report["speed_protocol"] = f"prompt processing of 512 tokens, best of 3 per node process, median of {rounds} processes, measured alone"
    report_path.write_text(json.dumps(report, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--speed-only", action="store_true", help="only re-measure llama.cpp's prompt speed on the exports in --out (see speed())")
    ap.add_argument("--speed-rounds", type=int, default=3)
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--tune-steps", type=int, default=20, help="also tune the original's result this many steps (qaft tune) and export it; 0: skip")
    add_run_arguments(ap, ROOT, "gguf_export")
    args = ap.parse_args()
    if args.speed_only:
        return speed(Path(args.out), args.speed_rounds)
    work = Path(args.work)
    models = {"original": "smollm2-135m"}
    for name in args.runs:
        models[name] = fine_tune(TRAIN, args.steps, [*Q4_0, *args.set, *args.train_set], RUNS[name], work / name)
    if args.tune_steps:
        models["original+tune"] = models["original"]
    report = {"steps": args.steps, "tune_steps": args.tune_steps, "results": {}}
    for name, source in models.items():
        tuned = name.endswith("+tune")
        cfg = load_config(
            EVAL,
            [
                f"model.name_or_path={source}",
                *Q4_0,
                "postpass.reconstructor=l2qer",
                "postpass.rank=32",
                f"training.output_dir={work / ('post-' + name)}",
                "export.runtime_check=required",
                f"tune.steps={args.tune_steps if tuned else 0}",
                *args.set,
            ],
        )
        quantize_and_save(cfg, overwrite=True, progress=False)
        if tuned:
            tune_run(cfg, overwrite=True)
        out, m = export_run(cfg, overwrite=True, progress=False)
        model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=source))
        ids, calib = token_stream(cfg.eval.path, tok, key="eval.path"), calibration_of(cfg, tok)
        in_memory = {"rtn": quantized_ppl(model, calib, ids, EVAL, "rtn", [*Q4_0, *args.set])}
        if not tuned:  # the tuned factors exist only in the export
            in_memory["l2qer"] = quantized_ppl(model, calib, ids, EVAL, "l2qer", [*Q4_0, "postpass.rank=32", *args.set])
        ppl, rt = m["evaluation"]["ppl"], m["runtime_check"]
        r = {
            "ppl_reloaded_gguf": ppl,
            "ppl_in_memory": in_memory,
            "gguf_vs_in_memory": {"rtn": ppl["base"] / in_memory["rtn"] - 1} | ({} if tuned else {"l2qer": ppl["base+adapter"] / in_memory["l2qer"] - 1}),
            "llamacpp_vs_transformers": {"model": ppl["llama.cpp"] / ppl["base"] - 1, "model+adapter": ppl["llama.cpp+adapter"] / ppl["base+adapter"] - 1},
            "adapter_gain_llamacpp_over_transformers": (ppl["llama.cpp"] - ppl["llama.cpp+adapter"]) / (ppl["base"] - ppl["base+adapter"]),
            "prompt_tokens_per_s": {n: row["prompt_tokens_per_s"] for n, row in rt["rows"].items()},
            "greedy_agreement": rt["generation"]["agreement"],
            "llamacpp_runtime": rt["runtime"],
            "sizes": m["sizes"],
            "parity": m["parity"],
            "export": str(out),
        }
        report["results"][name] = r
        print(name, json.dumps({k: r[k] for k in ("ppl_reloaded_gguf", "ppl_in_memory", "llamacpp_vs_transformers", "prompt_tokens_per_s")}), flush=True)
        report["protocol"] = (
            f"train {TRAIN.name} {args.steps} steps seed 0 | Q4_0 RTN + L2QER r32, calibration {cfg.postpass.calibration_samples} x "
            f"{cfg.postpass.calibration_seq_len}; +tune: {args.tune_steps} steps of qaft tune | ppl: WikiText-2 test {cfg.eval.windows} x "
            f"{cfg.eval.seq_len}, same token ids for transformers and llama.cpp | llama.cpp {m['runtime_check']['runtime']['binding']}, "
            f"CPU, {m['runtime_check']['runtime']['threads']} threads"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(report["protocol"])
    print(f"{'model':<14}{'float':>8}{'Q4_0 gguf':>11}{'in mem':>8}{'+L2QER gguf':>13}{'in mem':>8}{'model MiB':>11}{'adapter MiB':>13}")
    for name, r in report["results"].items():
        p, q, s = r["ppl_reloaded_gguf"], r["ppl_in_memory"], r["sizes"]
        print(
            f"{name:<14}{p['float']:>8.2f}{p['base']:>11.2f}{q['rtn']:>8.2f}{p['base+adapter']:>13.2f}{q.get('l2qer', float('nan')):>8.2f}"
            f"{s['base_bytes'] / 2**20:>11.1f}{s['adapter_bytes'] / 2**20:>13.1f}"
        )
    print(f"\n{'model':<14}{'transformers':>13}{'llama.cpp':>10}{'+adapter tf':>12}{'llama.cpp':>10}{'gain ratio':>11}{'tok/s':>7}{'+adapter':>9}{'greedy':>8}")
    for name, r in report["results"].items():
        p, t = r["ppl_reloaded_gguf"], r["prompt_tokens_per_s"]
        print(
            f"{name:<14}{p['base']:>13.2f}{p['llama.cpp']:>10.2f}{p['base+adapter']:>12.2f}{p['llama.cpp+adapter']:>10.2f}"
            f"{r['adapter_gain_llamacpp_over_transformers']:>11.1%}{t['llama.cpp']:>7.0f}{t['llama.cpp+adapter']:>9.0f}"
            f"{r['greedy_agreement']['llama.cpp+adapter']:>8.0%}"
        )


if __name__ == "__main__":
    main()
