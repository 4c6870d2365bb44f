"""qaft's learned rounding beside Intel's AutoRound, on the same calibration tokens, windows and iterations, in one invocation.

Protocol: SmolLM2-135M-Instruct, WikiText-2 test 8 × 512 windows, calibration = qaft's own 16 × 512 tokens
from the start of WikiText-2 validation (``configs/smollm2-postpass.yaml``), 50 iterations of 2048 tokens
each (AutoRound ``batch_size=4`` × 512; qaft ``batch: 4``), seed 42 for AutoRound. AutoRound runs its
default algorithm (block-wise sign-gradient rounding + min/max tuning, quantized inputs) on its own grid
(its "sym" int4 uses codes −8…7 with a signed scale: qaft's ``quant.weight.full_range: true``, which the int
rows use, so both learn on the same grid; ``--no-full-range`` keeps qaft's ±7 default), in bf16 where the CPU
has bf16 units and in float32 elsewhere (its ``amp`` set by qaft's own detection, ``bf16: auto``: AutoRound
itself would run bf16 on any CPU, emulated and ~3× slower where the units are missing); the model
it returns holds the de-quantized weights, evaluated in float32 like qaft's. Bits per weight: 4 + 16 / (channel or group width) for both (fp16 scales).

Needs the ``peers`` extra (``pip install -e '.[peers]'``: ``auto-round``); installs nothing at run time.
    .venv/bin/python benchmarks/peers.py --schemes w4 w4g64       # ~25 min on 2 cores
Writes ``benchmarks/results/peers.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from qaft.core.hardware import resolve_bf16
from qaft.core.model import load_model_and_tokenizer
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of, run_method
from qaft.pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"
SCHEMES = {  # name → (qaft overrides, AutoRound's scheme, bits per weight)
    "w4": ([], {"scheme": "W4A16", "bits": 4, "group_size": -1, "sym": True}, 4 + 16 / 576),
    "w4g64": (["quant.weight.granularity=group", "quant.weight.group_size=64"], {"scheme": "W4A16", "bits": 4, "group_size": 64, "sym": True}, 4 + 16 / 64),
    "q4_0": (["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"], {"scheme": "gguf:q4_0"}, 4 + 16 / 32),
}
ITERS, BATCH = 50, 4
AMP = resolve_bf16("auto")[0]


def autoround(model: torch.nn.Module, tok, calib: torch.Tensor, scheme: dict) -> torch.nn.Module:
    from auto_round import AutoRound

    ar = AutoRound(
        model,
        tok,
        **scheme,
        dataset=[seq[None] for seq in calib],
        iters=ITERS,
        nsamples=len(calib),
        seqlen=calib.shape[1],
        batch_size=BATCH,
        device_map="cpu",
        amp=AMP,
        enable_torch_compile=False,
        seed=42,
    )
    quantized, _ = ar.quantize()
    return quantized.float()  # under amp it returns a bf16 model; evaluate in float32 as qaft's


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--objective", default="block", help="qaft signround objective")
    ap.add_argument("--no-full-range", dest="full_range", action="store_false", help="int rows on qaft's ±7 grid instead of AutoRound's −8…7")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.json"))
    args = ap.parse_args()
    try:
        import auto_round
    except ImportError:
        raise SystemExit("benchmarks/peers.py needs auto-round: pip install -e '.[peers]'") from None

    cfg0 = load_config(CONFIG)
    model, tok = load_model_and_tokenizer(cfg0.model)
    ids, calib = token_stream(cfg0.eval.path, tok, key="eval.path"), calibration_of(cfg0, tok)
    ppl = lambda m: perplexity(m, ids, cfg0.eval.seq_len, cfg0.eval.windows, progress=False).ppl  # noqa: E731
    report = {
        "protocol": (
            f"SmolLM2-135M | WikiText-2 test {cfg0.eval.windows} x {cfg0.eval.seq_len} | calibration {len(calib)} x {calib.shape[1]} "
            f"from WikiText-2 valid | {ITERS} iterations of {BATCH} x {calib.shape[1]} tokens | torch threads {torch.get_num_threads()} | "
            f"{'bf16' if AMP else 'float32'} for both"
        ),
        "auto_round_version": auto_round.__version__,
        "fp": {"ppl": ppl(model)},
        "results": {},
    }
    print(report["protocol"], f"\nfloat ppl {report['fp']['ppl']:.2f}", flush=True)
    quantizer = f"postpass.quantizer={{name: signround, iters: {ITERS}, objective: {args.objective}, batch: {BATCH}}}"
    for scheme in args.schemes:
        overrides, theirs, bits = SCHEMES[scheme]
        rows = {}
        t0 = time.perf_counter()
        m = autoround(copy.deepcopy(model), tok, calib, theirs)
        rows["auto-round"] = {"seconds": time.perf_counter() - t0, "ppl": ppl(m)}
        grid = ["quant.weight.full_range=true"] if args.full_range and theirs.get("sym") else []
        cfg = load_config(CONFIG, [*overrides, *grid, quantizer])
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        run_method(m, calib, cfg, "signround", progress=False)
        rows["qaft signround"] = {"seconds": time.perf_counter() - t0, "ppl": ppl(m), "objective": args.objective}
        report["results"][scheme] = {"label": cfg.quant.label, "bits_per_weight": bits, **rows}
        for name, r in rows.items():
            print(f"{scheme:<6} {name:<15} {bits:.2f} bits/weight  ppl {r['ppl']:7.2f}  {r['seconds']:6.1f} s", flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
