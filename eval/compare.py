"""``qaft eval``: perplexity of the float model and of every requested post-pass method, on one protocol.

Loads the float model once; each method quantizes its own copy (layer-sequential, so each
method's later layers calibrate on its own quantized outputs), then all are evaluated on the same
windows. Calibration takes the first ``calibration_samples × calibration_seq_len`` tokens of the
calibration text (deterministic, so no seed is involved), which must not be the evaluation text.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qaft.trainer.config import Config, DataConfig
from qaft.core.errors import ConfigError, DataError
from qaft.core.typed import to_plain

from qaft.quant.postpass import quantize_model
from .perplexity import perplexity, token_stream, windows_of

@dataclass(frozen=True)
class Method:
    """A weight quantizer × an error reconstruction (× smoothing): methods compose, they are not copies."""

    quantize: bool
    reconstructor: str | None = None
    smooth: bool = False
    gptq: bool = False


_RECON = {"lqer": Method(True, "lqer"), "l2qer": Method(True, "l2qer"), "whiten": Method(True, "whiten"),
          "aser": Method(True, "whiten", smooth=True)}  # ASER = whitening SVD on activation-smoothed weights
METHODS: dict[str, Method] = {
    "fp": Method(quantize=False),
    "rtn": Method(quantize=True),
    **_RECON,
    "gptq": Method(True, gptq=True),
    **{f"gptq+{k}": Method(True, m.reconstructor, m.smooth, gptq=True) for k, m in _RECON.items()},
}


def method_name(quantizer: str, reconstructor: str) -> str:
    """``postpass.quantizer`` × ``postpass.reconstructor`` → a METHODS key."""
    if quantizer == "gptq":
        return "gptq" if reconstructor == "none" else f"gptq+{reconstructor}"
    return "rtn" if reconstructor == "none" else reconstructor


def run_method(model: torch.nn.Module, calib: torch.Tensor, cfg: Config, method: str, progress: bool) -> list:
    """Quantize ``model`` in place with ``method`` under the config's scheme, rank and smoothing; returns layer reports."""
    from functools import partial

    from qaft.quant.postpass import rtn
    from qaft.quant.quantizers.gptq import GPTQSettings, gptq

    spec = METHODS[method]
    g = cfg.postpass.gptq
    quantizer = partial(gptq, settings=GPTQSettings(g.damp, g.block_size, g.act_order)) if spec.gptq else rtn
    reports, _ = quantize_model(
        model, calib, cfg.quant, spec.reconstructor, cfg.postpass.rank, randomized_svd=cfg.postpass.randomized_svd, energy=cfg.postpass.energy,
        factor_bits=cfg.postpass.factor_bits, quantizer=quantizer, smoothing=cfg.postpass.smoothing if spec.smooth else None, progress=progress,
    )
    return reports


def parse_methods(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        from qaft.core.typed import suggest

        raise ConfigError([f"--methods: unknown method {m!r}{suggest(m, METHODS)}" for m in bad] or ["--methods: give at least one method"])
    return names


def calibration_ids(cfg: Config, tokenizer: Any) -> torch.Tensor:
    """``[calibration_samples, calibration_seq_len]`` ids from the start of the calibration text."""
    p = cfg.postpass
    path = p.calibration_path or cfg.data.path
    if Path(path).is_file():
        ids = token_stream(path, tokenizer)
    else:
        from qaft.trainer.data import load_documents

        docs = load_documents(DataConfig(path=path, text_column=cfg.data.text_column))
        ids = torch.tensor(tokenizer("\n\n".join(docs[cfg.data.text_column]), add_special_tokens=False)["input_ids"])
    if ids.numel() < p.calibration_samples * p.calibration_seq_len:
        raise DataError(f"postpass.calibration_path: {path!r} has {ids.numel()} tokens, fewer than {p.calibration_samples} x {p.calibration_seq_len}")
    return windows_of(ids, p.calibration_seq_len, p.calibration_samples)


def calibration_record(cfg: Config, ids: torch.Tensor) -> dict[str, Any]:
    """Where the calibration tokens came from and a sha256 of them (and of the file, when it is one)."""
    from qaft.export.manifest import sha256_file

    p = cfg.postpass
    path = p.calibration_path or cfg.data.path
    return {
        "path": path, "sha256": sha256_file(Path(path)) if Path(path).is_file() else None,
        "samples": p.calibration_samples, "seq_len": p.calibration_seq_len, "tokens": ids.numel(),
        "tokens_sha256": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
    }


def check_inputs(cfg: Config) -> Path:
    if cfg.eval.path is None:
        raise ConfigError("eval.path: not set; give the evaluation text, e.g. eval.path=../shared/data/wikitext-2-raw/wiki.test.raw")
    from qaft.core import text as corpora

    path = Path(cfg.eval.path)
    if not corpora.is_builtin(cfg.eval.path) and not path.is_file():
        raise DataError(f"eval.path: file {cfg.eval.path!r} does not exist")
    if corpora.same_source(cfg.postpass.calibration_path or cfg.data.path, cfg.eval.path):
        raise ConfigError("postpass.calibration_path: the calibration text is the evaluation text; calibrate on other data (e.g. WikiText-2 validation)")
    return path


def compare(cfg: Config, methods: list[str], *, export: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity of each method (and of an export folder, hashes checked first, reloaded with transformers + peft)."""
    from qaft.core.model import load_model_and_tokenizer

    eval_path = check_inputs(cfg)
    results: dict[str, Any] = {}
    if export is not None:
        from qaft.export.exporter import load_export

        exported, tok, record = load_export(export)
        eval_ids = token_stream(eval_path, tok)
        rows = {"export": exported}
        if hasattr(exported, "disable_adapter"):
            rows = {"export-base": exported, "export": exported}
        for name in rows:
            with (exported.disable_adapter() if name == "export-base" else contextlib.nullcontext()):
                r = perplexity(exported, eval_ids, cfg.eval.seq_len, cfg.eval.windows, progress=progress)
            results[name] = {"ppl": r.ppl, "seconds": r.seconds, "eval_seconds": r.seconds, "manifest_verified": True, "layers": []}
        del exported
    if methods:
        model, tok = load_model_and_tokenizer(cfg.model)
        eval_ids = token_stream(eval_path, tok)
        calib = calibration_ids(cfg, tok) if any(METHODS[m].quantize for m in methods) else None
        results |= evaluate_methods(model, eval_ids, calib, cfg, methods, progress)
    r = windows_of(eval_ids, cfg.eval.seq_len, cfg.eval.windows)
    return {
        "protocol": {
            "model": cfg.model.name_or_path, "eval_path": str(eval_path), "windows": r.shape[0], "seq_len": r.shape[1], "tokens": r.shape[0] * (r.shape[1] - 1),
            "scheme": cfg.quant.label, "rank": cfg.postpass.rank, "energy": cfg.postpass.energy, "factor_bits": cfg.postpass.factor_bits, "svd": "randomized" if cfg.postpass.randomized_svd else "exact",
            "calibration": {"path": cfg.postpass.calibration_path or cfg.data.path, "samples": cfg.postpass.calibration_samples, "seq_len": cfg.postpass.calibration_seq_len},
        },
        "results": results,
    } | ({"export": {"path": str(export), "scheme": record["scheme_label"], "method": record["method"], "manifest_verified": True}} if export is not None else {})


def evaluate_methods(model: torch.nn.Module, eval_ids: torch.Tensor, calib: torch.Tensor | None, cfg: Config, methods: list[str],
                     progress: bool) -> dict[str, dict[str, Any]]:
    """Perplexity of ``model`` under each method; every quantizing method works on its own copy (``model`` is untouched)."""
    results = {}
    for m in methods:
        t0 = time.perf_counter()
        mm = copy.deepcopy(model) if METHODS[m].quantize else model
        layers = [asdict(r) for r in run_method(mm, calib, cfg, m, progress)] if METHODS[m].quantize else []
        postpass_s = time.perf_counter() - t0
        r = perplexity(mm, eval_ids, cfg.eval.seq_len, cfg.eval.windows, progress=progress)
        results[m] = {"ppl": r.ppl, "seconds": postpass_s + r.seconds, "postpass_seconds": postpass_s, "eval_seconds": r.seconds, "layers": layers}
        del mm
    return results


def quantize_and_save(cfg: Config, *, overwrite: bool, progress: bool = True) -> Path:
    """``qaft quantize``: the configured post-pass on ``model.name_or_path``, saved with ``store.save_quantized``."""
    from qaft.core.model import load_model_and_tokenizer

    from qaft.quant.store import ensure_writable, save_quantized

    p = cfg.postpass
    out = Path(p.output_dir or Path(cfg.training.output_dir) / "quantized")
    ensure_writable(out, overwrite)  # before the model load; save_quantized checks again
    model, tok = load_model_and_tokenizer(cfg.model)
    calib = calibration_ids(cfg, tok)
    method = method_name(p.quantizer, p.reconstructor)
    t0 = time.perf_counter()
    reports = run_method(model, calib, cfg, method, progress)
    meta = {
        "method": f"{p.quantizer}+{p.reconstructor}", "rank": p.rank if METHODS[method].reconstructor else 0,
        "factor_bits": p.factor_bits if METHODS[method].reconstructor else None,
        "gptq": to_plain(p.gptq) if METHODS[method].gptq else None, "source_model": cfg.model.name_or_path,
        "smoothing": to_plain(p.smoothing) if METHODS[method].smooth else None,
        "calibration": calibration_record(cfg, calib), "randomized_svd": p.randomized_svd,
        "seconds": time.perf_counter() - t0, "layers": [asdict(r) for r in reports],
    }
    return save_quantized(model, tok, out, cfg.quant, meta, overwrite=overwrite)


def table(report: dict[str, Any]) -> str:
    p = report["protocol"]
    fp = report["results"].get("fp", {}).get("ppl")
    rtn = report["results"].get("rtn", {}).get("ppl")
    factors = f" (int{p['factor_bits']} factors)" if p.get("factor_bits") else ""
    head = (f"WikiText-2 perplexity | {p['model']} | {p['scheme']}, rank {p['rank']}{factors} | {p['windows']} windows x {p['seq_len']} tokens | "
            f"calibration {p['calibration']['samples']} x {p['calibration']['seq_len']} from {p['calibration']['path']}")
    if "export" in report:
        e = report["export"]
        head += f"\nexport rows: {e['path']} ({e['scheme']} + {e['method']}; manifest hashes verified; activations rounded as compressed-tensors does)"
    w = max(8, *(len(m) + 2 for m in report["results"]))
    rows = [head, f"{'method':<{w}}{'ppl':>10}{'gap closed':>12}{'seconds':>10}"]
    for m, r in report["results"].items():
        closed = "" if fp is None or rtn is None or m in ("fp", "rtn") or rtn == fp else f"{(rtn - r['ppl']) / (rtn - fp):>11.0%}"
        rows.append(f"{m:<{w}}{r['ppl']:>10.2f}{closed:>12}{r['seconds']:>10.1f}")
    return "\n".join(rows)


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
