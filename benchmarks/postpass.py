"""Post-pass benchmark on SmolLM2-135M: perplexity vs rank for every method and scheme, timings, peak RSS,
and the singular-value spectra the LQER paper builds its argument on.

Each (scheme, method, rank) runs the real layer-sequential post-pass (``qaft.pipeline.commands.run_method``)
on a copy of the float model, loaded once; protocol as in ``configs/smollm2-postpass.yaml``
(calibration 16 × 512 tokens from the start of WikiText-2 validation, 8 × 512 test windows).
Writes ``benchmarks/results/postpass.json``, ``postpass_ppl_vs_rank.png`` and ``postpass_spectra.png``
(needs the ``plots`` extra: matplotlib). Each post-pass is ~1.5–2 min on 2 cores, so the full grid
(5 schemes × 3 methods × 3 ranks + RTN) takes ~1.5 h:

    .venv/bin/python benchmarks/postpass.py                                   # full grid
    .venv/bin/python benchmarks/postpass.py --schemes w4 w4a8 --ranks 8 32    # a quicker slice
    .venv/bin/python benchmarks/postpass.py --schemes w4 --ranks 32 --methods gptq gptq+l2qer gptq+aser --json-name postpass_gptq.json --no-spectra
    .venv/bin/python benchmarks/postpass.py --schemes w4 w4g64 q4_0 --ranks 32 --methods signround gptq signround+whiten \
        --set "postpass.quantizer={name: signround, iters: 50}" --json-name postpass_signround.json --no-spectra
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch

from qaft.core.model import load_model_and_tokenizer
from qaft.core.modules import decoder_layers
from qaft.core.text import token_stream
from qaft.eval.perplexity import perplexity
from qaft.pipeline.commands import calibration_of, run_method
from qaft.pipeline.config import load_config
from qaft.quant import methods
from qaft.quant.calibrate import collect
from qaft.quant.grid import quantize_weight
from qaft.quant.postpass import capture_inputs
from qaft.quant.quantizers import QUANTIZERS
from qaft.quant.reconstructors.l2qer import activation_scale
from qaft.quant.reconstructors.whiten import cholesky_with_jitter

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-postpass.yaml"
SCHEMES = {  # name → overrides of configs/smollm2-postpass.yaml (576 is not divisible by 128: groups of 64)
    "w4": [],
    "w4g64": ["quant.weight.granularity=group", "quant.weight.group_size=64"],
    "w3g64": ["quant.weight.bits=3", "quant.weight.granularity=group", "quant.weight.group_size=64"],
    "mxint4": ["quant.weight.format=mxint", "quant.weight.granularity=group", "quant.weight.group_size=16"],
    "w4a8": ["quant.activation.bits=8"],
    "q4_0": ["quant.weight.format=gguf", "quant.weight.gguf_type=Q4_0"],
}


def spectra(model, calib, cfg, layer_index: int, names: list[str]) -> dict[str, dict[str, list[float]]]:
    """Normalised singular values of E, E·diag(s) and E·L for some Linears of one layer (float inputs)."""
    prefix, layers = decoder_layers(model)
    inputs = capture_inputs(model, layers[0], calib)
    with torch.no_grad():
        for layer in layers[:layer_index]:
            inputs = [(layer(h, **kw), kw) for h, kw in inputs]
        targets = {n: m for n, m in cfg.quant.layer_linears(layers[layer_index], f"{prefix}.{layer_index}").items() if n in names}
        with collect(targets) as stats:
            for h, kw in inputs:
                layers[layer_index](h, **kw)
    out = {}
    for n, lin in targets.items():
        w = lin.weight.detach().double()
        e = w - quantize_weight(w, cfg.quant.weight).dequant.double()
        mats = {"E": e, "E diag(s)": e * activation_scale(stats[n]), "E L": e @ cholesky_with_jitter(stats[n].covariance)}
        out[n] = {k: (torch.linalg.svdvals(m) / torch.linalg.svdvals(m)[0]).tolist() for k, m in mats.items()}
    return out


def plot(report: dict, out_dir: Path, stem: str = "postpass") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    schemes = list(report["results"])
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 3.6), squeeze=False)
    for ax, scheme in zip(axes[0], schemes):
        r = report["results"][scheme]
        for method, by_rank in r["methods"].items():
            ranks = sorted(int(k) for k in by_rank)
            ax.plot(ranks, [by_rank[str(k)]["ppl"] for k in ranks], marker="o", label=method)
        ax.axhline(r["rtn"]["ppl"], color="grey", ls="--", label="RTN")
        for i, (name, b) in enumerate(r.get("baselines", {}).items()):
            ax.axhline(b["ppl"], color=f"C{7 + i}", ls="-.", label=name)
        ax.axhline(report["fp"]["ppl"], color="black", ls=":", label="float")
        ax.set_title(scheme)
        ax.set_xlabel("rank")
        ax.set_ylabel("WikiText-2 ppl")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(report["protocol"], fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_ppl_vs_rank.png", dpi=120)
    files.append(str(out_dir / f"{stem}_ppl_vs_rank.png"))
    if "spectra" not in report:
        return files
    sp = report["spectra"]["layers"]
    fig, axes = plt.subplots(1, len(sp), figsize=(4.2 * len(sp), 3.4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], sp.items()):
        for label, values in curves.items():
            ax.semilogy(values, label=label)
        ax.set_title(f"layer {report['spectra']['layer']} {name}", fontsize=9)
        ax.set_xlabel("index")
        ax.set_ylabel("σ / σ₁")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}_spectra.png", dpi=120)
    files.append(str(out_dir / f"{stem}_spectra.png"))
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w4", "w4g64", "w3g64", "mxint4", "w4a8"], choices=list(SCHEMES))
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["lqer", "l2qer", "aser"],
        choices=[m for m in methods.names() if m not in ("fp", "rtn")],
        help="reconstruction methods (run at every rank) and quantizer-only ones such as gptq (run once)",
    )
    ap.add_argument("--json-name", default="postpass.json", help="output file name; the PNGs take its stem")
    ap.add_argument("--no-spectra", action="store_true", help="skip the singular-value spectra figure")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra overrides (e.g. 'postpass.quantizer={name: gptq, act_order: true}')")
    ap.add_argument("--ranks", nargs="+", type=int, default=[8, 16, 32])
    ap.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only merge earlier result files (later ones win per scheme) and plot")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        report = {**parts[0], "results": {}, "parts": [p["protocol"] for p in parts]}
        for part in parts:
            report["results"] |= part["results"]
            report |= {k: part[k] for k in ("spectra", "peak_rss_gb") if k in part}
        Path(out_dir / args.json_name).write_text(json.dumps(report, indent=2))
        print(f"merged {len(parts)} files into {out_dir / args.json_name}:", *plot(report, out_dir, Path(args.json_name).stem))
        return

    cfg0 = load_config(CONFIG)
    model, tok = load_model_and_tokenizer(cfg0.model)
    ids, calib = token_stream(cfg0.eval.path, tok, key="eval.path"), calibration_of(cfg0, tok)
    fp = perplexity(model, ids, cfg0.eval.seq_len, cfg0.eval.windows, progress=False)
    report = {
        "protocol": (
            f"SmolLM2-135M | WikiText-2 test {fp.windows} x {fp.seq_len} | calibration {cfg0.postpass.calibration_samples} x "
            f"{cfg0.postpass.calibration_seq_len} from WikiText-2 valid | {'randomized' if cfg0.postpass.randomized_svd else 'exact'} SVD | "
            f"torch threads {torch.get_num_threads()}"
        ),
        "fp": {"ppl": fp.ppl},
        "overrides": args.set,
        "results": {},
    }
    print(report["protocol"], f"\nfloat ppl {fp.ppl:.2f}", flush=True)

    def one(overrides: list[str], method: str, rank: int) -> dict:
        cfg = load_config(CONFIG, overrides + args.set + [f"postpass.rank={rank}"])
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        layers = run_method(m, calib, cfg, method, progress=False)
        post = time.perf_counter() - t0
        ppl = perplexity(m, ids, cfg.eval.seq_len, cfg.eval.windows, progress=False).ppl
        return {"ppl": ppl, "postpass_seconds": post, "reconstruct_seconds": sum(r.seconds for r in layers), "scheme": cfg.quant.label}

    for scheme in args.schemes:
        ov = SCHEMES[scheme]
        rtn = one(ov, "rtn", 0)
        res = {"label": rtn["scheme"], "rtn": rtn, "methods": {}}
        print(f"{scheme:<7} {rtn['scheme']:<26} rtn    ppl {rtn['ppl']:8.2f}", flush=True)
        for method in [m for m in args.methods if m in QUANTIZERS]:  # quantizer only: no rank
            res.setdefault("baselines", {})[method] = r = one(ov, method, 0)
            print(f"{scheme:<7} {rtn['scheme']:<26} {method:<6} ppl {r['ppl']:8.2f}  post-pass {r['postpass_seconds']:6.1f} s", flush=True)
        for method in [m for m in args.methods if m not in QUANTIZERS]:
            res["methods"][method] = {}
            for rank in args.ranks:
                r = one(ov, method, rank)
                res["methods"][method][str(rank)] = r
                print(
                    f"{scheme:<7} {rtn['scheme']:<26} {method:<6} rank {rank:>3} ppl {r['ppl']:8.2f}  "
                    f"post-pass {r['postpass_seconds']:6.1f} s (reconstruct {r['reconstruct_seconds']:5.1f} s)",
                    flush=True,
                )
        report["results"][scheme] = res
        Path(out_dir / args.json_name).write_text(json.dumps(report, indent=2))  # partial results survive an interrupt
    if not args.no_spectra:
        report["spectra"] = {"layer": 10, "layers": spectra(model, calib, cfg0, 10, ["self_attn.q_proj", "mlp.down_proj"])}
    report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    Path(out_dir / args.json_name).write_text(json.dumps(report, indent=2))
    try:
        files = plot(report, out_dir, Path(args.json_name).stem)
    except ImportError:
        files = ["(no plots: pip install 'qaft[plots]')"]
    print(f"peak RSS {report['peak_rss_gb']:.2f} GB; wrote {out_dir / args.json_name} {' '.join(files)}")


if __name__ == "__main__":
    main()
