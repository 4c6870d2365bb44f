"""``qaft export``: a post-pass result → a folder users can ship without qaft.

    export/                     (export.format: compressed-tensors, for int schemes)
      base/           Hugging Face model, quantized Linears packed by compressed-tensors (``ctpack``)
      adapter/        the low-rank factors as a PEFT LoRA adapter, scaling 1 (``adapter``)
      README.md       model card: scheme, method, perplexity table, sizes, parity, how to load
      manifest.json   provenance and a sha256 of every file (``manifest``)
    export/                     (export.format: gguf, for GGUF schemes; ``ggufexport``)
      model-<TYPE>.gguf, adapter-lowrank.gguf, README.md, manifest.json

Written into ``.tmp-export`` and renamed only after the reload parity check passed, so a failed or
interrupted export never leaves a folder that looks complete. Parity: ``base/`` is reloaded with
transformers and ``adapter/`` with peft, and logits on fixed prompts are compared with the
in-memory fake-quant model; with activation quantization off on both sides the two compute the same
function (tolerance ``export.parity_atol``); with it on, the only difference left is the activation
rounding convention (``ctpack``'s docstring), reported but not enforced.
"""

from __future__ import annotations

import copy
import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml

from qaft.trainer.checkpoint import publish
from qaft.trainer.config import Config
from qaft.core.errors import ExportError
from qaft.core.typed import parse

from . import manifest
from .peft_adapter import WEIGHTS, write_adapter
from .ctpack import FORMAT, check_expressible, reference_activation_quant, write_packed
from qaft.quant.fakequant import QuantLinear
from qaft.quant.grid import fake_quant_activation
from qaft.quant.scheme import ActQuant, QuantScheme, WeightFormat
from qaft.quant.store import META, ensure_writable, load_quantized

PROMPTS = (
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "In 1066, William the Conqueror landed in England and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Quantization maps each weight to the nearest point of a grid, so",
)
"""Fixed parity prompts: prose, a continuation, code, and the domain."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    """Largest |logit difference| over every prompt position, activation quantization off on both sides."""
    top1_agreement: float
    act_max_abs_diff: float | None = None
    """With activation quantization on, ours rounding as compressed-tensors does (enforced too)."""
    server_act_max_abs_diff: float | None = None
    """With ours rounding as a server does (``max|x| / 127``): the convention gap, reported only."""
    server_act_top1_agreement: float | None = None
    tolerance: float = 0.0


def source_dir(cfg: Config) -> Path:
    return Path(cfg.postpass.output_dir or Path(cfg.training.output_dir) / "quantized")


def export_dir(cfg: Config) -> Path:
    return Path(cfg.export.dir or Path(cfg.training.output_dir) / "export")


def export_format(cfg: Config, scheme: QuantScheme) -> str:
    """``export.format``, ``auto`` resolved by the scheme; a format that cannot hold the scheme is an error."""
    gguf_scheme = scheme.weight.format is WeightFormat.GGUF
    fmt = cfg.export.format if cfg.export.format != "auto" else ("gguf" if gguf_scheme else "compressed-tensors")
    if fmt == "gguf" and not gguf_scheme:
        raise ExportError(f"export.format: gguf files hold llama.cpp's block grids, and this result is {scheme.weight.label}; quantize with "
                          "quant.weight.format=gguf quant.weight.gguf_type=Q4_0 (or Q4_1, Q5_0, Q5_1, Q8_0, MXFP4), or use export.format=compressed-tensors")
    if fmt == "compressed-tensors":
        check_expressible(scheme)
    return fmt


def check_destination(cfg: Config, scheme: QuantScheme, overwrite: bool) -> Path:
    """The export can be written: a format that can hold the scheme, a free (or --overwrite) folder."""
    export_format(cfg, scheme)
    out = export_dir(cfg)
    ensure_writable(out, overwrite, key="export.dir")
    return out


def preflight(cfg: Config, overwrite: bool) -> tuple[Path, Path]:
    """Everything that can fail before the model loads: the post-pass result, its scheme, the destination."""
    src = source_dir(cfg)
    if not (src / META).is_file():
        raise ExportError(f"postpass.output_dir: no post-pass result at {src} (no {META}); run `qaft quantize CONFIG` first, or `qaft quantize CONFIG --export`")
    meta = json.loads((src / META).read_text())
    return src, check_destination(cfg, parse(QuantScheme, meta["scheme"], "scheme"), overwrite)


@contextmanager
def activations_float(model: torch.nn.Module) -> Iterator[None]:
    """Turn activation quantization off in both our layers and compressed-tensors' (restored on exit)."""
    ours = [m for m in model.modules() if isinstance(m, QuantLinear)]
    theirs = [m for m in model.modules() if getattr(m, "quantization_scheme", None) is not None]
    acts = [m.act for m in ours]
    enabled = [getattr(m, "quantization_enabled", True) for m in theirs]
    for m in ours:
        m.act = ActQuant()
    for m in theirs:
        m.quantization_enabled = False  # the weights are already de-compressed grid values; only inputs change
    try:
        yield
    finally:
        for m, a in zip(ours, acts):
            m.act = a
        for m, e in zip(theirs, enabled):
            m.quantization_enabled = e


@torch.no_grad()
def compare_logits(a: torch.nn.Module, b: torch.nn.Module, prompts: list[torch.Tensor]) -> tuple[float, float]:
    worst, agree, total = 0.0, 0, 0
    for ids in prompts:
        la, lb = a(input_ids=ids[None]).logits[0].float(), b(input_ids=ids[None]).logits[0].float()
        worst = max(worst, (la - lb).abs().max().item())
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        total += ids.numel()
    return worst, agree / total


LOADERS = ("transformers", "compressed-tensors")
"""Two ways to read ``base/``: ``AutoModelForCausalLM.from_pretrained``, and ``ctpack.load_packed`` (the
library's own decompression), which also reads asymmetric schemes that transformers cannot (see there)."""


def load_export(path: str | Path, *, verify: bool = True, loader: str | None = None) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """``(model, tokenizer, manifest)`` from an export folder (hashes checked first), without qaft's own layers.

    The model is the packed base with the adapter attached by peft (a ``PeftModel``), or the base alone
    when the export has no adapter. ``loader``: ``transformers`` (``from_pretrained``; the int4 weights
    stay packed until the first forward, but peft needs a ``.weight`` to wrap, so they are
    de-compressed here, which is also all a CPU can do: no int4 kernel, memory of the float model) or
    ``compressed-tensors`` (``ctpack.load_packed``); None picks transformers unless the scheme is
    asymmetric. Either way the dynamic activation quantization in ``config.json`` stays active."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .ctpack import load_packed
    from .ggufformat import load_gguf

    root = Path(path)
    record = manifest.verify(root) if verify else {}
    if any(root.glob("model-*.gguf")):
        model, tok = load_gguf(root)
        return model, tok, record
    if loader is None:
        groups = json.loads((root / "base" / "config.json").read_text())["quantization_config"]["config_groups"]
        loader = "transformers" if all(g["weights"]["symmetric"] for g in groups.values()) else "compressed-tensors"
    if loader == "transformers":
        base = AutoModelForCausalLM.from_pretrained(root / "base")
        quantizer = getattr(base, "hf_quantizer", None)
        if quantizer is not None and hasattr(quantizer, "compressor"):
            quantizer.compressor.decompress_model(base)
    else:
        base = load_packed(root / "base")
    model = PeftModel.from_pretrained(base, root / "adapter") if (root / "adapter" / WEIGHTS).is_file() else base
    return model.eval(), AutoTokenizer.from_pretrained(root / "base"), record


@contextmanager
def reference_rounding(model: torch.nn.Module) -> Iterator[None]:
    """Our layers round activations as compressed-tensors' Python code does, for an exact comparison."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in layers:
        m.act_fn = reference_activation_quant
    try:
        yield
    finally:
        for m in layers:
            m.act_fn = fake_quant_activation


def check_parity(folder: Path, reference: torch.nn.Module, tokenizer: Any, scheme: QuantScheme, tolerance: float) -> dict[str, Parity]:
    """Compare the in-memory model with ``base/`` + ``adapter/`` read by every loader that can read them."""
    prompts = [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    loaders = LOADERS if scheme.weight.symmetric else LOADERS[1:]
    results = {}
    for loader in loaders:
        loaded, _, _ = load_export(folder, verify=False, loader=loader)
        with activations_float(reference), activations_float(loaded):
            diff, top1 = compare_logits(reference, loaded, prompts)
        act_diff, server = None, (None, None)
        if scheme.activation.bits is not None:
            with reference_rounding(reference):
                act_diff, _ = compare_logits(reference, loaded, prompts)
            server = compare_logits(reference, loaded, prompts)
        worst = max(diff, act_diff or 0.0)
        if not worst <= tolerance:
            raise ExportError(f"reload parity failed ({loader} loader): max |logit diff| {worst:.3g} > export.parity_atol {tolerance:g} "
                              f"(top-1 agreement {top1:.1%}); this is a bug in qaft or in the installed transformers/peft/compressed-tensors, please report it")
        results[loader] = Parity(diff, top1, act_diff, *server, tolerance=tolerance)
        del loaded
    return results


def parameter_count(reference: torch.nn.Module) -> int:
    """Weights of the model as a float checkpoint would hold them (tied tensors once; no codes, scales or factors)."""
    seen, params = set(), 0
    for name, t in list(reference.named_parameters()) + list(reference.named_buffers()):
        if t.data_ptr() in seen or name.rpartition(".")[2] in ("codes", "scale", "zero", "lora_A", "lora_B", "input_scale"):
            continue
        seen.add(t.data_ptr())
        params += t.numel()
    return params


def size_record(reference: torch.nn.Module, *, packed_bytes: int, base_bytes: int, adapter_bytes: int, factor_bytes: int) -> dict[str, Any]:
    """The manifest's ``sizes``, one shape for every format: bytes on disk, and effective bits per
    quantized weight (``packed_bytes``: codes + scales [+ zeros]; then + ``factor_bytes`` of the adapter)."""
    params = parameter_count(reference)
    quantized = sum(m.weight.numel() for m in reference.modules() if isinstance(m, QuantLinear))
    return {
        "parameters": params, "quantized_weights": quantized,
        "float32_bytes": 4 * params, "bfloat16_bytes": 2 * params,
        "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
        "bits_per_weight_base": 8 * packed_bytes / quantized,
        "bits_per_weight_with_adapter": 8 * (packed_bytes + factor_bytes) / quantized,
    }


def sizes(folder: Path, reference: torch.nn.Module) -> dict[str, Any]:
    """``size_record`` of ``base/`` + ``adapter/``: packed bytes read from the compressed-tensors tensors."""
    from safetensors import safe_open

    packed_bytes = 0
    for f in (folder / "base").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.rpartition(".")[2] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    t = st.get_tensor(key)
                    packed_bytes += t.numel() * t.element_size()
    on_disk = lambda sub: sum(p.stat().st_size for p in (folder / sub).rglob("*") if p.is_file())  # noqa: E731
    adapter_file = folder / "adapter" / WEIGHTS
    return size_record(reference, packed_bytes=packed_bytes, base_bytes=on_disk("base"),
                       adapter_bytes=on_disk("adapter") if (folder / "adapter").is_dir() else 0,
                       factor_bytes=adapter_file.stat().st_size if adapter_file.is_file() else 0)


def training_record(cfg: Config) -> dict[str, Any] | None:
    """The training run behind the model, when ``model.name_or_path`` is a run's ``final/`` (it holds ``config.yaml``)."""
    path = Path(cfg.model.name_or_path) / "config.yaml"
    if not path.is_file():
        return None
    train_cfg = yaml.safe_load(path.read_text())
    return {"config_path": str(path), "callbacks": [c.get("name") for c in train_cfg.get("callbacks") or []],
            "seed": (train_cfg.get("training") or {}).get("seed"), "config": train_cfg}


def evaluate(cfg: Config, folder: Path, progress: bool) -> dict[str, Any] | None:
    """Perplexity of the float source model, the packed base alone and base + adapter, reloaded from ``folder``."""
    from qaft.core.model import load_model_and_tokenizer

    from qaft.eval.perplexity import perplexity, token_stream

    if cfg.eval.path is None:
        return None
    loaded, tok, _ = load_export(folder, verify=False)
    ids = token_stream(cfg.eval.path, tok)
    run = lambda m: perplexity(m, ids, cfg.eval.seq_len, cfg.eval.windows, progress=progress)  # noqa: E731
    results = {}
    if hasattr(loaded, "disable_adapter"):
        with loaded.disable_adapter():
            results["base"] = run(loaded).ppl
        results["base+adapter"] = run(loaded).ppl
    else:
        results["base"] = run(loaded).ppl
    del loaded
    float_model, _ = load_model_and_tokenizer(cfg.model)
    r = run(float_model)
    results = {"float": r.ppl, **results}
    return {"protocol": {"eval_path": cfg.eval.path, "windows": r.windows, "seq_len": r.seq_len, "tokens": r.tokens}, "ppl": results}


def write_compressed_tensors(cfg: Config, tmp: Path, model: torch.nn.Module, reference: torch.nn.Module, tok: Any, scheme: QuantScheme,
                             meta: dict[str, Any], progress: bool) -> dict[str, Any]:
    """``base/`` + ``adapter/`` into ``tmp``, parity-checked and measured: the format-specific part of the manifest."""
    ranks = write_adapter(model, tmp / "adapter", base_name_or_path="base")
    quantized = write_packed(model, tok, scheme, tmp / "base")
    parity = check_parity(tmp, reference, tok, scheme, cfg.export.parity_atol)
    return {
        "format": {"base": f"compressed-tensors {FORMAT}", "adapter": "peft lora" if ranks else None},
        "ranks": ranks or {}, "quantized_modules": quantized, "parity": {k: asdict(v) for k, v in parity.items()},
        "sizes": sizes(tmp, reference), "evaluation": evaluate(cfg, tmp, progress) if cfg.export.evaluate else None,
    }


def export(cfg: Config, *, overwrite: bool, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Write the export folder; returns its path and manifest."""
    from .card import model_card
    from .ggufformat import write_gguf
    from .gguffile import check_model

    src, out = preflight(cfg, overwrite)
    model, tok, meta = load_quantized(src)
    scheme = parse(QuantScheme, meta["scheme"], "scheme")
    fmt = export_format(cfg, scheme)
    if fmt == "gguf":
        check_model(model, scheme)
    reference = copy.deepcopy(model)  # the writers may consume ``model``
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        written = (write_gguf if fmt == "gguf" else write_compressed_tensors)(cfg, tmp, model, reference, tok, scheme, meta, progress)
        del model, reference
        training = training_record(cfg)
        record = {
            **written, "scheme": meta["scheme"], "scheme_label": scheme.label, "method": meta["method"],
            "rank": meta["rank"], "factor_bits": meta.get("factor_bits"), "smoothing": meta.get("smoothing"),
            "source_model": meta["source_model"], "calibration": meta["calibration"], "training": training,
            "seeds": {"training": (training or {}).get("seed"), "randomized_svd": 0 if meta.get("randomized_svd") else None},
            "postpass_seconds": meta.get("seconds"),
        }
        (tmp / "README.md").write_text(model_card(record))
        written = manifest.write(tmp, record)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, written
