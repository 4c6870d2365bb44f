"""The eval stage of ``qaft run``: one perplexity table over the original and the fine-tuned model.

Rows, all on the config's ``eval`` protocol: (original | fine-tuned) × (fp, RTN of the scheme, RTN
at each ``run.rtn_bits``); on the fine-tuned model also ``run.methods``, the saved post-pass result
(``quantized/``), the tuned one (``tune/final/``, when ``tune.steps`` > 0; the one the export ships)
and the export reloaded by its runtime: the numbers the export stage measured on this protocol and recorded in
its manifest (hashes verified), else ``qaft eval --export``'s own function, so the report, the model card and
that command agree.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qaft.core import text
from qaft.core.model import load_model_and_tokenizer
from qaft.eval.compare import evaluate_methods
from qaft.eval.perplexity import perplexity
from qaft.export import manifest
from qaft.export.llamacpp import ROWS as LLAMACPP_ROWS
from qaft.quant.store import load_quantized

from .commands import calibration_of, check_eval_inputs, compare, protocol_of
from .config import Config

RUNTIME_ROWS = tuple(LLAMACPP_ROWS.values())


def with_bits(cfg: Config, bits: int) -> Config:
    return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, weight=dataclasses.replace(cfg.quant.weight, bits=bits)))


def _row(model: str, method: str, scheme: str | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "method": method, "scheme": scheme, "ppl": result["ppl"], "seconds": result["seconds"]}


def evaluate_run(cfg: Config, tuned: Config, out: Path, *, progress: bool = True) -> dict[str, Any]:
    eval_path = check_eval_inputs(cfg)
    rows: list[dict[str, Any]] = []
    sources = [("original", cfg), ("fine-tuned", tuned)] if cfg.run.compare_original else [("fine-tuned", tuned)]
    for label, source in sources:
        model, tok = load_model_and_tokenizer(source.model)
        ids, calib = text.token_stream(eval_path, tok, key="eval.path"), calibration_of(source, tok)
        plans = [(source, ["fp", "rtn"])] + [(with_bits(source, b), ["rtn"]) for b in source.run.rtn_bits]
        if label == "fine-tuned":
            plans.append((source, list(source.run.methods)))
        for scheme_cfg, methods in plans:
            for m, r in evaluate_methods(model, ids, calib, scheme_cfg.quant, scheme_cfg.postpass, methods, scheme_cfg.eval, progress).items():
                rows.append(_row(label, m, None if m == "fp" else scheme_cfg.quant.label, r))
        del model
    for folder in [tuned.quantized_dir] + ([tuned.tune_dir / "final"] if cfg.tune.steps else []):  # as solved, then tuned
        qmodel, tok, meta = load_quantized(folder)
        r = perplexity(qmodel, text.token_stream(eval_path, tok, key="eval.path"), cfg.eval.seq_len, cfg.eval.windows, progress=progress)
        label = f"{meta['method']} r{meta['rank']}" if meta["rank"] else meta["method"]
        rows.append(_row("fine-tuned", label, cfg.quant.label, {"ppl": r.ppl, "seconds": r.seconds}))
        del qmodel
    recorded = recorded_export_rows(tuned, ids)
    if recorded is None:
        exported = compare(tuned, [], export=tuned.export_dir, progress=progress)
        recorded, protocol = (exported["export"]["scheme"], exported["results"]), exported["protocol"]
    else:
        protocol = protocol_of(tuned, eval_path, ids)
    for name, res in recorded[1].items():
        rows.append(_row("fine-tuned", name, recorded[0], res))
    protocol |= {"model": cfg.model.name_or_path, "fine_tuned": str(tuned.model.name_or_path)}
    return {"protocol": protocol, "rows": rows}


def recorded_export_rows(cfg: Config, ids: Any) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """``(scheme, rows)`` of the export folder from its manifest (hashes verified) when the export stage already
    measured it, reloaded by its runtime, on this very protocol (same text, windows, window length); else None.
    Saves the stage three perplexity runs and gives the report the numbers the model card shows."""
    record = manifest.verify(cfg.export_dir)
    ev = record.get("evaluation")
    want = text.windows_of(ids, cfg.eval.seq_len, cfg.eval.windows).shape
    same = ev and ev["protocol"]["eval_path"] == cfg.eval.path and (ev["protocol"]["windows"], ev["protocol"]["seq_len"]) == tuple(want)
    if not same or ev["protocol"].get("bos", False) != text.bos_first(ids):
        return None
    ppl = ev["ppl"]
    measured = {"export-base": ppl["base"], "export": ppl["base+adapter"]} if "base+adapter" in ppl else {"export": ppl["base"]}
    measured |= {name: ppl[name] for name in RUNTIME_ROWS if name in ppl}  # what the export's runtime check measured (llama.cpp)
    return record["scheme_label"], {n: {"ppl": v, "seconds": None, "manifest_verified": True} for n, v in measured.items()}
