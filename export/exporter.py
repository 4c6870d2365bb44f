"""``qaft export``: a post-pass result (``quant.store`` folder) → a folder users can ship without qaft.

    export/
      <the format's files>   compressed-tensors ``base/`` + ``adapter/``, or GGUF model + adapter files (``formats``)
      README.md              model card: scheme, method, perplexity table, sizes, parity, how to load
      manifest.json          provenance and a sha256 of every file (``manifest``)

Written into ``.tmp-<dir>`` and renamed only after the format's reload parity check passed, so a failed
or interrupted export never leaves a folder that looks complete.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from qaft.core.errors import ExportError, PreflightError
from qaft.core.io import ensure_writable, staged
from qaft.core.model import ModelConfig, load_model_and_tokenizer
from qaft.core.text import bos_first, token_stream, windows_of
from qaft.core.typed import parse
from qaft.eval.config import EvalConfig
from qaft.eval.perplexity import perplexity
from qaft.quant.fakequant import factors_to_fp16
from qaft.quant.scheme import QuantScheme
from qaft.quant.store import META, load_quantized

from . import manifest
from .config import ExportConfig
from .formats import ExportFormat, of_folder, resolve


def check_destination(settings: ExportConfig, scheme: QuantScheme, out: Path, overwrite: bool) -> type[ExportFormat]:
    """The export can be written: a format that can hold the scheme, a free (or --overwrite) folder."""
    fmt = resolve(settings.format, scheme)
    ensure_writable(out, overwrite, key="export.dir")
    return fmt


def read_source(src: Path) -> dict[str, Any]:
    """The post-pass record of ``src``, or one line saying how to make one."""
    if not (src / META).is_file():
        raise ExportError(
            f"postpass.output_dir: no post-pass result at {src} (no {META}); run `qaft quantize CONFIG` first, or `qaft quantize CONFIG --export`"
        )
    return json.loads((src / META).read_text())


def load_export(path: str | Path, *, verify: bool = True, loader: str | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, manifest)`` from an export folder (hashes checked first), without qaft's own layers.

    The model is the format's own reload (peft's ``PeftModel`` for compressed-tensors, transformers' GGUF
    loader + the adapter's factors for GGUF); ``disable_adapter()`` turns the factors off. ``loader``
    picks the compressed-tensors reader (see ``ctformat.CompressedTensors.load``)."""
    root = Path(path)
    record = manifest.verify(root) if verify else {}
    fmt = of_folder(root)
    model, tok = fmt.load(root, loader=loader) if loader else fmt.load(root)
    return model, tok, record


def training_record(source_model: str) -> dict[str, Any] | None:
    """The training run behind the model, when it is a run's ``final/`` (which holds the run's ``config.yaml``)."""
    path = Path(source_model) / "config.yaml"
    if not path.is_file():
        return None
    train_cfg = yaml.safe_load(path.read_text())
    return {
        "config_path": str(path),
        "callbacks": [c.get("name") for c in train_cfg.get("callbacks") or []],
        "seed": (train_cfg.get("training") or {}).get("seed"),
        "config": train_cfg,
    }


def evaluate_export(reloaded: tuple[torch.nn.Module, Any], protocol: EvalConfig, progress: bool) -> tuple[dict[str, float], dict[str, Any], torch.Tensor]:
    """Perplexity of the packed base alone and of base + adapter (``reloaded``: the format's reload of the
    folder), the protocol record, and the protocol's windows (token ids of the folder's tokenizer) for the
    runtime check."""
    loaded, tok = reloaded
    ids = token_stream(protocol.path, tok, key="eval.path")
    run = lambda: perplexity(loaded, ids, protocol.seq_len, protocol.windows, progress=progress)  # noqa: E731
    ppl = {}
    if hasattr(loaded, "disable_adapter"):
        with loaded.disable_adapter():
            ppl["base"] = run().ppl
    r = run()
    ppl["base+adapter" if "base" in ppl else "base"] = r.ppl
    record = {"eval_path": protocol.path, "windows": r.windows, "seq_len": r.seq_len, "tokens": r.tokens, "bos": bos_first(ids)}
    return ppl, record, windows_of(ids, protocol.seq_len, protocol.windows)


def float_ppl(source: ModelConfig, protocol: EvalConfig, progress: bool) -> float:
    """The float source model's perplexity on the protocol (the table's first row), with its own tokenizer."""
    model, tok = load_model_and_tokenizer(source)
    return perplexity(model, token_stream(protocol.path, tok, key="eval.path"), protocol.seq_len, protocol.windows, progress=progress).ppl


def check_runtime(fmt: type[ExportFormat], settings: ExportConfig) -> None:
    """``export.runtime_check: required`` with the runtime absent fails before any work."""
    why = fmt.runtime_missing() if fmt.runtime and settings.runtime_check == "required" else None
    if why:
        raise PreflightError(f"export.runtime_check: required, but {fmt.runtime} cannot run here: {why}; or set export.runtime_check=auto")


def runtime_record(writer: ExportFormat, folder: Path, settings: ExportConfig, windows: torch.Tensor | None) -> dict[str, Any] | None:
    """The manifest's ``runtime_check``: what the format's runtime measured on the files, or why it did not run."""
    if writer.runtime is None or settings.runtime_check == "skip":
        return None
    why = writer.runtime_missing()
    return {"runtime": {"name": writer.runtime}, "skipped": why} if why else writer.runtime_check(folder, windows, writer.reload(folder))


def enforce_runtime(program: str | None, runtime: dict[str, Any] | None, ppl: dict[str, float] | None, rtol: float) -> None:
    """The runtime gate: each perplexity the runtime measured on the files against the reload's own on the same
    windows; beyond ``export.runtime_ppl_rtol`` the export fails and nothing is published."""
    for name, row in ((runtime or {}).get("rows") or {}).items():
        ref = (ppl or {}).get(row["reload"])
        if ref is not None and not abs(row["ppl"] - ref) <= rtol * ref:
            raise ExportError(
                f"runtime check failed: {name} perplexity {row['ppl']:.4f} vs transformers' reload {ref:.4f} ({row['reload']}) of the same files, "
                f"{abs(row['ppl'] / ref - 1):.2%} apart > export.runtime_ppl_rtol {rtol:g}; {program} reads the files differently "
                "(nothing was published): this is a bug in qaft or in the installed runtime, please report it"
            )


def export(
    src: Path, out: Path, settings: ExportConfig, *, source: ModelConfig, protocol: EvalConfig | None, overwrite: bool, progress: bool = True
) -> tuple[Path, dict[str, Any]]:
    """Write the export folder ``out`` from the post-pass result ``src``; returns its path and manifest.

    ``source`` is the float model the post-pass quantized (the perplexity table's ``float`` row);
    ``protocol`` the perplexity protocol (None, or ``settings.evaluate`` false: no table)."""
    meta = read_source(src)
    scheme = parse(QuantScheme, meta["scheme"], "scheme")
    fmt = check_destination(settings, scheme, out, overwrite)
    check_runtime(fmt, settings)
    model, tok, meta = load_quantized(src)
    fmt.check_model(model, scheme)
    factors_to_fp16(model)  # fp16 already, unless the folder predates that: the reference is what the files hold
    reference = copy.deepcopy(model) if fmt.consumes_model else model
    writer = fmt()
    with staged(out) as tmp:
        written = writer.write(tmp, model, reference, tok, scheme, meta, settings)
        del model, reference
        training = training_record(meta["source_model"])
        evaluation, windows = None, None
        if settings.evaluate and protocol is not None and protocol.path:
            ppl, record, windows = evaluate_export(writer.reload(tmp), protocol, progress)
            evaluation = {"protocol": record, "ppl": ppl}
        runtime = runtime_record(writer, tmp, settings, windows)
        writer.release()
        enforce_runtime(writer.runtime, runtime, (evaluation or {}).get("ppl"), settings.runtime_ppl_rtol)
        if evaluation:  # the float source last: one model in memory at a time
            evaluation["ppl"] = {"float": float_ppl(source, protocol, progress)} | evaluation["ppl"]
            evaluation["ppl"] |= {name: row["ppl"] for name, row in (runtime or {}).get("rows", {}).items()}
        record = {
            **written,
            "scheme": meta["scheme"],
            "scheme_label": scheme.label,
            "method": meta["method"],
            "rank": meta["rank"],
            "factor_bits": meta.get("factor_bits"),
            "quantizer": meta.get("quantizer"),
            "reconstructor": meta.get("reconstructor"),
            "source_model": meta["source_model"],
            "calibration": meta["calibration"],
            "training": training,
            "seeds": {"training": (training or {}).get("seed"), "randomized_svd": 0 if meta.get("randomized_svd") else None},
            "postpass_seconds": meta.get("seconds"),
            "evaluation": evaluation,
            "runtime_check": runtime,
        }
        (tmp / "README.md").write_text(fmt.card(record))
        written = manifest.write(tmp, record)
    return out, written
