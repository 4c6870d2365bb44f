"""``export.format: compressed-tensors``: a packed int checkpoint + the factors as a PEFT LoRA adapter.

    export/
      base/           Hugging Face model, quantized Linears packed by compressed-tensors (``ctpack``)
      adapter/        the low-rank factors as a PEFT LoRA adapter, scaling 1 (``peft_adapter``)

Parity: ``base/`` is reloaded with transformers and ``adapter/`` with peft, and the logits on fixed
prompts are compared with the in-memory fake-quant model; with activation quantization off on both
sides the two compute the same function (tolerance ``export.parity_atol``); with it on, the only
difference left is the activation rounding convention (``ctpack``'s docstring): compared exactly under
compressed-tensors' own rounding, and the gap to a server's rounding reported but not enforced.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from qaft.core.io import folder_size
from qaft.quant.fakequant import QuantLinear, off_scheme_formats
from qaft.quant.grid import fake_quant_activation
from qaft.quant.scheme import ActQuant, QuantScheme, WeightFormat, WeightQuant

from .card import made_with, mb, perplexity_section, provenance_note
from .config import ExportConfig
from .ctpack import FORMAT, check_expressible, load_packed, loads_compressed, reference_activation_quant, write_packed
from .formats import FORMATS, ExportFormat
from .parity import Parity, compare_logits, enforce, prompt_ids, round_as_stored
from .peft_adapter import WEIGHTS, write_adapter
from .sizes import size_record

LOADERS = ("transformers", "compressed-tensors")
"""Two ways to read ``base/``: ``AutoModelForCausalLM.from_pretrained``, and ``ctpack.load_packed`` (the
library's own decompression), which also reads the one kind transformers cannot (``transformers_reads``)."""


def transformers_reads(scheme: QuantScheme, formats: Mapping[str, WeightQuant]) -> bool:
    """Whether ``from_pretrained`` reads the export: the de-compressing route (``ctpack.dequantize_on_load``) reads
    any one format; the compressed route (``ctpack.loads_compressed``: activation quantization, several formats)
    fails on asymmetric zero points (``ctpack.load_packed``). ``formats``: the Linears off ``scheme.weight``."""
    return not loads_compressed(scheme, bool(formats)) or all(spec.symmetric for spec in (scheme.weight, *formats.values()))


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


def check_parity(
    folder: Path, reference: torch.nn.Module, tokenizer: Any, scheme: QuantScheme, formats: Mapping[str, WeightQuant], tolerance: float
) -> dict[str, Parity]:
    """Compare the in-memory model with ``base/`` + ``adapter/`` read by every loader that can read them
    (``formats``: the Linears off ``scheme.weight``, ``transformers_reads``)."""
    prompts = prompt_ids(tokenizer)
    results = {}
    for loader in LOADERS if transformers_reads(scheme, formats) else LOADERS[1:]:
        loaded, _ = CompressedTensors.load(folder, loader=loader)
        with activations_float(reference), activations_float(loaded):
            diff, top1 = compare_logits(reference, loaded, prompts)
        act_diff, server = None, (None, None)
        if scheme.activation.bits is not None:
            with reference_rounding(reference):
                act_diff, _ = compare_logits(reference, loaded, prompts)
            server = compare_logits(reference, loaded, prompts)
        enforce(f"{loader} loader", max(diff, act_diff or 0.0), top1, tolerance, "transformers/peft/compressed-tensors")
        results[loader] = Parity(diff, top1, act_diff, *server, tolerance=tolerance)
        del loaded
    return results


def stored_floats(reference: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``reference`` with the tensors that stay float (all but the quantized Linears' grid weights, scales and
    factors) rounded to ``dtype``, as ``write_packed`` stores them."""
    rounded = copy.deepcopy(reference)
    round_as_stored(rounded, dtype, lambda name, t, quantized: not quantized or name == "bias")
    return rounded


def sizes(folder: Path, reference: torch.nn.Module) -> dict[str, Any]:
    """``size_record`` of ``base/`` + ``adapter/``: packed bytes read from the compressed-tensors tensors, and the bytes
    of the tensors that stay float (``float_bytes``)."""
    packed_bytes = float_bytes = 0
    for f in (folder / "base").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if key.rpartition(".")[2] in ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"):
                    packed_bytes += t.numel() * t.element_size()
                else:
                    float_bytes += t.numel() * t.element_size()
    adapter_file = folder / "adapter" / WEIGHTS
    return size_record(
        reference,
        packed_bytes=packed_bytes,
        base_bytes=folder_size(folder / "base"),
        adapter_bytes=folder_size(folder / "adapter"),
        factor_bytes=adapter_file.stat().st_size if adapter_file.is_file() else 0,
    ) | {"packed_bytes": packed_bytes, "float_bytes": float_bytes}


def load_snippet(base: str, adapter: str, *, ranks: bool, activations: bool, mixed: bool = False, transformers: bool = True) -> list[str]:
    """The card's Python to load the export with transformers + peft (executed as written by the tests). Exports of
    one weight-only format load de-compressed (``ctpack.dequantize_on_load``); activation-quantized ones and ones
    with several formats (``mixed``) load compressed (``ctpack.loads_compressed``: the dynamic input quantization
    kept, each Linear on its own format) and are de-compressed after loading for peft, which needs a ``.weight``;
    where transformers cannot read the folder (``transformers_reads``), qaft's own loader."""
    if not transformers:
        folder = str(Path(base).parent)
        return ["```python", "import qaft", "", f'model, tokenizer, manifest = qaft.load_quantized("{folder}")  # checks the manifest\'s hashes too', "```"]
    load = f'base = AutoModelForCausalLM.from_pretrained("{base}", dtype=torch.float32)'
    if activations:
        load += "  # int4 packed; input activations quantized as recorded"
    elif mixed:
        load += "  # each Linear packed at the bits the budget chose for it"
    else:
        load += "  # int4 packed on disk, de-compressed to float on load"
    return [
        "```python",
        "import torch",
        "from peft import PeftModel  # needs: pip install compressed-tensors peft",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        "# float32 compute, as qaft measured the files (dtype='auto' keeps the float tensors in their stored export.float_dtype)",
        "",
        load,
        *(["base.hf_quantizer.compressor.decompress_model(base)  # peft wraps a .weight: de-compress the packed Linears"] if activations or mixed else []),
        f'model = PeftModel.from_pretrained(base, "{adapter}")  # the low-rank error correction' if ranks else "model = base",
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
        "```",
    ]


@FORMATS.register
class CompressedTensors(ExportFormat):
    name = "compressed-tensors"
    summary = "packed checkpoint + PEFT adapter"

    @classmethod
    def native(cls, scheme: QuantScheme) -> bool:
        return scheme.weight.format is WeightFormat.INT

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        check_expressible(scheme)

    menu_fix = "give postpass.budget_formats int formats only (e.g. {bits: 8})"

    @classmethod
    def holds(cls, spec: WeightQuant) -> bool:
        """Any int format: one config group per format (``ctpack``)."""
        return spec.format is WeightFormat.INT

    def write(
        self, tmp: Path, model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, scheme: QuantScheme, meta: dict[str, Any], settings: ExportConfig
    ) -> dict[str, Any]:
        formats = off_scheme_formats(model, scheme.weight)  # read before write_packed consumes the QuantLinears
        ranks = write_adapter(model, tmp / "adapter", base_name_or_path="base")
        dtype = getattr(torch, settings.float_dtype)
        quantized = write_packed(model, tokenizer, scheme, formats, tmp / "base", dtype)
        parity = check_parity(tmp, stored_floats(reference, dtype), tokenizer, scheme, formats, settings.parity_atol)
        return {
            "format": {"base": f"compressed-tensors {FORMAT}", "adapter": "peft lora" if ranks else None},
            "ranks": ranks or {},
            "quantized_modules": quantized,
            **({"layer_formats": {n: spec.label for n, spec in formats.items()}} if formats else {}),
            "parity": {k: asdict(v) for k, v in parity.items()},
            "sizes": sizes(tmp, reference) | {"float_dtype": settings.float_dtype},
        }

    @classmethod
    def owns(cls, folder: Path) -> bool:
        return (folder / "base" / "config.json").is_file()

    @classmethod
    def load(cls, folder: Path, *, loader: str | None = None) -> tuple[torch.nn.Module, Any]:
        """The packed base with the adapter attached by peft (a ``PeftModel``), or the base alone without an
        adapter. ``loader``: ``transformers`` (``from_pretrained``; the int4 weights stay packed until the first
        forward, but peft needs a ``.weight`` to wrap, so they are de-compressed here, which is also all a CPU
        can do: no int4 kernel, memory of the float model) or ``compressed-tensors`` (``ctpack.load_packed``);
        None picks transformers unless it cannot read the folder (``transformers_reads``). Either way the dynamic activation
        quantization in ``config.json`` stays active."""
        if loader is None:
            q = json.loads((folder / "base" / "config.json").read_text())["quantization_config"]
            readable = q.get("dequantize") or all(g["weights"]["symmetric"] for g in q["config_groups"].values())
            loader = "transformers" if readable else "compressed-tensors"
        if loader == "transformers":
            base = AutoModelForCausalLM.from_pretrained(folder / "base", dtype=torch.float32)  # float32 compute whatever the files store
            quantizer = getattr(base, "hf_quantizer", None)
            if quantizer is not None and hasattr(quantizer, "compressor"):
                quantizer.compressor.decompress_model(base)
        else:
            base = load_packed(folder / "base")
        model = PeftModel.from_pretrained(base, folder / "adapter") if (folder / "adapter" / WEIGHTS).is_file() else base
        return model.eval(), AutoTokenizer.from_pretrained(folder / "base")

    @classmethod
    def card(cls, m: dict[str, Any]) -> str:
        s, p = m["sizes"], m["parity"]
        bits = f", int{m['factor_bits']} factors" if m.get("factor_bits") else ""
        lines = [
            "---",
            "library_name: peft",
            "tags: [qaft, compressed-tensors, int4, lora]",
            "---",
            "",
            *made_with(m, "`base/`, compressed-tensors `pack-quantized`", f"`adapter/`, PEFT LoRA, scaling 1{bits}"),
            *perplexity_section(m),
        ]
        lines += [
            "## Size",
            "",
            f"float32 {mb(s['float32_bytes'])}, bfloat16 {mb(s['bfloat16_bytes'])} → `base/` {mb(s['base_bytes'])} + `adapter/` {mb(s['adapter_bytes'])} on disk. "
            f"Quantized Linears: {s['bits_per_weight_base']:.2f} bits per weight (codes + scales), {s['bits_per_weight_with_adapter']:.2f} with the adapter. "
            + (
                f"`base/` holds {mb(s['packed_bytes'])} of packed Linears (codes, fp16 scales) and {mb(s['float_bytes'])} of tensors that stay float "
                f"(embeddings, norms, biases, an untied head, ignored Linears) in {s.get('float_dtype', 'float32')} (`export.float_dtype`)."
                if "float_bytes" in s
                else "Embeddings, norms and ignored layers are stored in float."
            ),
            "",
            "## Reload parity",
            "",
            "Logits of the reloaded files vs qaft's in-memory model on fixed prompts, activation quantization off on both sides"
            + (
                " and, separately, on (qaft rounding activations as compressed-tensors' Python code does, max|x|/127.5)"
                if any(v["act_max_abs_diff"] is not None for v in p.values())
                else ""
            )
            + ":",
            "",
            "| loader | max abs diff | top-1 agreement | with activation quantization | vs a server's max abs/127 rounding |",
            "|---|---|---|---|---|",
        ]
        for loader, v in p.items():
            act = "–" if v["act_max_abs_diff"] is None else f"{v['act_max_abs_diff']:.2e}"
            server = "–" if v["server_act_max_abs_diff"] is None else f"{v['server_act_max_abs_diff']:.2e} ({v['server_act_top1_agreement']:.1%} top-1)"
            lines.append(f"| {loader} | {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:g}) | {v['top1_agreement']:.1%} | {act} | {server} |")
        if "transformers" not in p:
            lines += [
                "",
                "transformers' `from_pretrained` cannot read asymmetric packed checkpoints with activation quantization in transformers 5.24 + "
                'compressed-tensors 0.20 (packed zero points are mis-sized on load); `qaft.load_quantized("export")` reads them with the '
                "library's own decompression.",
            ]
        acts = m["scheme"]["activation"]["bits"] is not None
        lines += [
            "",
            "## Load",
            "",
            *load_snippet("base", "adapter", ranks=bool(m["ranks"]), activations=acts, mixed=bool(m.get("layer_formats")), transformers="transformers" in p),
            "",
        ]
        lines += [
            "Activation quantization, when the scheme has it, is recorded as dynamic `input_activations` in `base/config.json`; "
            "servers that read compressed-tensors (vLLM) apply it at run time.",
            "",
            provenance_note(),
            "",
        ]
        return "\n".join(lines)
