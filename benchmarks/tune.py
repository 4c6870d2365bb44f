"""Tuned vs closed-form low-rank correction on SmolLM2-135M: ``qaft quantize`` then ``qaft tune``, per scheme.

Per scheme (and per ``--starts`` closed form): the post-pass on the source model (the original, or a
run's ``final/`` with ``--model``), its perplexity, ``qaft tune`` from it, the tuned perplexity; beside
the source model's float perplexity (the teacher: what tuning can at best recover) and, for A8 schemes,
the float model with the same activation quantization. GGUF schemes are also exported and reloaded
through transformers' GGUF loader (``export`` column). Bits per quantized weight count codes, fp16
scales (and minima) and fp16 factors, as a deployment would store them. Protocol of
``configs/smollm2-postpass.yaml``: WikiText-2 test 8 × 512, calibration 16 × 512 tokens from the start
of WikiText-2 valid; tuning reads the same validation text (its last 5% is held out and gives
``valid_*``, the numbers defaults are chosen on). Writes ``benchmarks/results/tune.json`` (``--out``).

``--train lora npft qat`` adds fine-tuned sources (the matrix of what users deploy): each a
``configs/smollm2-lora.yaml`` run (``--train-steps``, same data and seed), NPFT with
``noise: quant_step`` and QAT on the row's own grid (trained per scheme), plain LoRA once; every row
is measured against its own source's float perplexity.

``--reuse-postpass``: a cell whose ``--work`` folder already holds a post-pass result made by the same
scheme, method, quantizer and reconstructor options, rank, source and calibration tokens tunes from it
instead of solving it again (the SignRound starts take ~35 min on 2 cores); the row says so
(``postpass_reused``) and keeps the original's ``postpass_seconds``.

    .venv/bin/python benchmarks/tune.py --schemes w4 w4g64 q4_0 w4a8 w3g64 --steps 150
    .venv/bin/python benchmarks/tune.py --schemes w4g64r7 --starts signround-block+whiten --set quant.weight.full_range=true \
        tune.train_scales=true --work runs/bench-tune-held --reuse-postpass --out benchmarks/results/tune_scales.json
    .venv/bin/python benchmarks/tune.py --train lora npft qat --train-steps 60 --schemes w4 --starts l2qer whiten \
        --steps 100 --train-set training.per_device_train_batch_size=2 --out benchmarks/results/tune_sources.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import time
from pathlib import Path

import torch
from common import add_run_arguments, fine_tune, train_rows

from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.core.typed import to_plain
from qaft.eval.perplexity import perplexity
from qaft.export.exporter import load_export
from qaft.pipeline.commands import export_run, postpass_settings, quantize_and_save, tune_run
from qaft.pipeline.config import load_config
from qaft.quant.budget import model_bpw
from qaft.quant.grid import fake_quant_activation
from qaft.quant.store import META, load_quantized

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "configs" / "smollm2-postpass.yaml"
TRAIN = ROOT / "configs" / "smollm2-lora.yaml"
FINE_TUNES = {"lora": [], "npft": [{"name": "npft", "noise": "quant_step", "hessian_probes": 0}], "qat": [{"name": "qat"}]}
SCHEMES = {
    "w4": ["quant.weight.granularity=channel"],
    "w4g64": ["quant.weight.granularity=group", "quant.weight.group_size=64"],
    "w3g64": ["quant.weight.bits=3", "quant.weight.granularity=group", "quant.weight.group_size=64"],
    "w4a8": ["quant.activation.bits=8"],
    "q4_0": ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"],
    "w4r8": ["postpass.rank=8"],
    "q4_0r8": ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0", "postpass.rank=8"],
    "w4g64r4": ["quant.weight.granularity=group", "quant.weight.group_size=64", "postpass.rank=4"],
    "w4g64r7": ["quant.weight.granularity=group", "quant.weight.group_size=64", "postpass.rank=7"],  # the largest rank within 4.6 bits/weight
}
STARTS = {
    "l2qer": ["postpass.reconstructor=l2qer"],
    "whiten": ["postpass.reconstructor=whiten"],
    "gptq+whiten": ["postpass.quantizer=gptq", "postpass.reconstructor=whiten"],
    "zero": ["postpass.reconstructor=none", "tune.init=zero"],
    "signround+whiten": ["postpass.quantizer={name: signround, iters: 50, objective: linear}", "postpass.reconstructor=whiten"],
    "signround-block+whiten": ["postpass.quantizer={name: signround, iters: 50, objective: block}", "postpass.reconstructor=whiten"],
    "block": ["postpass.reconstructor=whiten", "tune.objective=block"],
    # learned rounding alone (refined on the uncorrected stream), then factors trained from zero on its residual
    "signround-block+zero": ["postpass.quantizer={name: signround, iters: 50, objective: block}", "postpass.reconstructor=none", "tune.init=zero"],
}


def a8_float_ppl(source: str, ids: torch.Tensor, cfg) -> float:
    """The float model with each decoder Linear's input fake-quantized as the scheme's activations: A8's own bound."""
    model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=source))
    for lin in cfg.quant.linears(model).values():
        lin.register_forward_pre_hook(lambda mod, args: (fake_quant_activation(args[0], cfg.quant.activation),))
    return perplexity(model, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl


def trained_source(method: str, scheme: str, args, work: Path) -> str:
    """A training run's ``final/`` (plain LoRA ignores the grid, so it is trained once)."""
    name = method if method == "lora" else f"{method}-{scheme}"
    out = work / "train" / name
    if (out / "final").is_dir():
        return str(out / "final")
    return fine_tune(TRAIN, args.train_steps, [*SCHEMES[scheme], *args.set, *args.train_set], FINE_TUNES[method], out)


def reusable_postpass(cfg) -> dict | None:
    """The record of the post-pass result in ``cfg.quantized_dir`` when this config would make the same one, else None."""
    path = cfg.quantized_dir / META
    if not path.is_file():
        return None
    meta, p = json.loads(path.read_text()), cfg.postpass
    calib = meta["calibration"]
    same = (
        meta["scheme"] == to_plain(cfg.quant)
        and all(meta.get(k) == v for k, v in postpass_settings(cfg).items())
        and (calib["path"], calib["samples"], calib["seq_len"]) == (str(cfg.calibration_path), p.calibration_samples, p.calibration_seq_len)
    )
    return meta if same else None


def tune_row(source: str, scheme: str, start: str, args, out: Path, ids: torch.Tensor, float_ppl: float) -> dict:
    """Post-pass, closed-form perplexity, ``qaft tune``, tuned perplexity (and the export's for GGUF) of one cell."""
    cfg = load_config(
        EVAL,
        [
            f"model.name_or_path={source}",
            "training.bf16=true",
            "postpass.randomized_svd=true",
            *SCHEMES[scheme],
            *STARTS[start],
            f"training.output_dir={out}",
            f"tune.steps={args.steps}",
            "tune.logging_steps=10",
            f"tune.eval_steps={max(args.steps // 3, 1)}",
            "tune.save_steps=0",
            *args.set,
        ],
    )
    row: dict = {"scheme": cfg.quant.label, "start": start, "rank": cfg.postpass.rank}
    reusable = reusable_postpass(cfg) if args.reuse_postpass else None
    if reusable is not None:
        row["postpass_reused"], row["postpass_seconds"] = str(cfg.quantized_dir), reusable["seconds"]
    else:
        t0 = time.perf_counter()
        quantize_and_save(cfg, overwrite=True, progress=False)
        row["postpass_seconds"] = time.perf_counter() - t0
    solved, _, _ = load_quantized(cfg.quantized_dir)
    row["bits_per_weight"] = model_bpw(solved)
    row["closed_form_ppl"] = perplexity(solved, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
    del solved
    t0 = time.perf_counter()
    final = tune_run(cfg, overwrite=True)
    row["tune_seconds"] = time.perf_counter() - t0
    tuned, _, _ = load_quantized(final)
    row["tuned_ppl"] = perplexity(tuned, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
    row["bits_per_weight_tuned"] = model_bpw(tuned)
    del tuned
    evals = train_rows(cfg.tune_dir, "eval")
    row["valid"] = [{k: r[k] for k in ("step", "eval_kl", "eval_ppl", "eval_teacher_ppl")} for r in evals]
    steps = [r["s_per_step"] for r in train_rows(cfg.tune_dir) if "s_per_step" in r]
    row["median_s_per_step"] = sorted(steps)[len(steps) // 2] if steps else None
    if cfg.quant.activation.bits is not None:
        row["a8_float_ppl"] = a8_float_ppl(source, ids, cfg)
    if cfg.quant.weight.gguf_type is not None:
        folder, _ = export_run(cfg, overwrite=True, progress=False)
        exported, _, _ = load_export(folder)
        row["export_ppl"] = perplexity(exported, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
        del exported
    bound = row.get("a8_float_ppl", float_ppl)
    row["closed_form_ratio"], row["tuned_ratio"] = row["closed_form_ppl"] / bound, row["tuned_ppl"] / bound
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w4", "w4g64", "q4_0", "w4a8", "w3g64"], choices=list(SCHEMES))
    ap.add_argument("--starts", nargs="+", default=["whiten"], choices=list(STARTS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--model", default="smollm2-135m", help="the source model: the original, or a training run's final/")
    ap.add_argument("--train", nargs="*", default=[], choices=list(FINE_TUNES), help="also fine-tuned sources (rows keyed source/scheme/start)")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--reuse-postpass", action="store_true", help="tune from a matching post-pass result already in --work")
    add_run_arguments(ap, ROOT, "tune")
    args = ap.parse_args()
    work = Path(args.work)
    report = {"model": args.model, "steps": args.steps, "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "results": {}}
    if args.train:
        report |= {"train": args.train, "train_steps": args.train_steps, "source_float_ppl": {}}
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=args.model))
    base = load_config(EVAL, [f"model.name_or_path={args.model}", *args.set])
    ids = token_stream(base.eval.path, tok, key="eval.path")
    floats = {args.model: perplexity(model, ids, base.eval.seq_len, base.eval.windows, progress=False).ppl}  # the fine-tuned ones on demand
    del model

    def float_ppl(source: str) -> float:
        if source not in floats:
            model, _ = load_model_and_tokenizer(ModelConfig(name_or_path=source))
            floats[source] = perplexity(model, ids, base.eval.seq_len, base.eval.windows, progress=False).ppl
        return floats[source]

    report["float_ppl"] = float_ppl(args.model)
    for scheme in args.schemes:
        sources = {"original": args.model} | {m: trained_source(m, scheme, args, work) for m in args.train}
        for label, source in sources.items():
            for start in args.starts:
                name = f"{scheme}/{start}" if not args.train else f"{label}/{scheme}/{start}"
                row = tune_row(source, scheme, start, args, work / label / scheme / start, ids, float_ppl(source))
                if args.train:
                    row["source"] = label
                    row["source_float_ppl"] = report["source_float_ppl"][f"{label}/{scheme}"] = float_ppl(source)
                report["results"][name] = row
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=2))
                print(
                    f"{name:<26} {row['bits_per_weight']:.2f} bits  closed form {row['closed_form_ppl']:.2f} ({row['closed_form_ratio']:.3f}x)  "
                    f"tuned {row['tuned_ppl']:.2f} ({row['tuned_ratio']:.3f}x)  {row['tune_seconds'] / 60:.1f} min",
                    flush=True,
                )
    print(
        f"float {report['float_ppl']:.2f}; WikiText-2 test {base.eval.windows} x {base.eval.seq_len}; {args.steps} tuning steps of "
        f"{base.tune.batch_size} x {base.tune.seq_len} tokens; {report['threads']} threads, OMP_WAIT_POLICY={report['omp_wait_policy']}"
    )


if __name__ == "__main__":
    main()
