"""Our ``QuantScheme`` + integer codes → a Hugging Face folder in compressed-tensors ``pack-quantized`` form.

The packing itself is the library's (``ModelCompressor.compress_model`` packs 32 codes per ``num_bits``
int32 words); we only translate the scheme and hand it *our* scales, so the library's
``round(w / scale) + zero`` lands exactly on the codes RTN chose (the de-quantized weight is
``codes · scale``, so the division recovers the codes up to float rounding far below 0.5).

Conventions that differ and how they map:

- symmetric int: compressed-tensors' range is ``[-2^(b-1), 2^(b-1) - 1]``; ours ``±(2^(b-1) - 1)``
  is a subset, stored unchanged.
- asymmetric int: ours is unsigned (codes and zero in ``[0, 2^b - 1]``); compressed-tensors' is
  signed, so both shift by ``2^(b-1)``; ``(code − zero) · scale`` is unchanged.
- MXINT has no compressed-tensors integer format (its MX formats are floating point): refused.
- several int formats (``postpass.budget_formats``): one config group per format, one targeting every ``Linear``
  for ``quant.weight`` and each other one naming its Linears exactly (exact names take precedence over class
  names when compressed-tensors matches targets); each Linear is packed at its own ``num_bits`` (1…8).
  vLLM fuses q/k/v and gate/up into one layer and requires one scheme per fused layer; transformers and
  compressed-tensors read any mix.
- activations: ``input_activations`` = dynamic symmetric int, per token or tensor. A server
  (vLLM's ``scaled_int8_quant``) uses ``scale = max|x| / (2^(b-1) - 1)``, as qaft's simulation does;
  compressed-tensors' own Python fake quantization divides by ``2^(b-1) - 0.5`` instead
  (``reference_activation_quant``), so a model reloaded through transformers differs from ours by
  that rounding convention alone; the export's parity check swaps it in and then demands equality.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
)
from loguru import logger  # compressed-tensors' logger
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from qaft.core.errors import ExportError
from qaft.quant.fakequant import QuantLinear
from qaft.quant.grid import stored_scale
from qaft.quant.scheme import ActGranularity, ActQuant, Granularity, QuantScheme, WeightFormat, WeightQuant

FORMAT = "pack-quantized"
SCALE_DTYPE = torch.float16
"""The scales' dtype in the files: qaft's int grids are fp16 values (``grid.stored_scale``) and the bits budget counts
16 bits each; the library would write them in the model's dtype (float32 on CPU: 16 bits more per group)."""


FLOATS = (torch.float32, torch.float64, torch.bfloat16)
"""Tensor dtypes ``write_packed`` stores as ``export.float_dtype`` (the fp16 scales keep their own)."""


def check_expressible(scheme: QuantScheme) -> None:
    """Fail with what would work when the scheme has no compressed-tensors form."""
    if scheme.weight.format is WeightFormat.MXINT:
        raise ExportError(
            f"quant.weight: {scheme.weight.label} has no compressed-tensors integer format (its MX formats are floating point); "
            "export an int scheme (e.g. quant.weight.format=int quant.weight.granularity=group quant.weight.group_size=64) or use GGUF"
        )
    if scheme.weight.format is WeightFormat.GGUF:
        raise ExportError(
            f"quant.weight: {scheme.weight.label} is a llama.cpp block format (fp16 scales, its own rounding), not a compressed-tensors one; "
            "evaluate it with qaft quantize / qaft eval, or export an int scheme (e.g. quant.weight.format=int quant.weight.granularity=group quant.weight.group_size=64)"
        )


def weight_args(w: WeightQuant) -> QuantizationArgs:
    """compressed-tensors' description of one int weight format."""
    strategy = {Granularity.TENSOR: "tensor", Granularity.CHANNEL: "channel", Granularity.GROUP: "group"}[w.granularity]
    return QuantizationArgs(
        num_bits=w.bits, type="int", symmetric=w.symmetric, strategy=strategy, group_size=w.group_size if w.granularity is Granularity.GROUP else None
    )


def quantization_config(scheme: QuantScheme, ignore: list[str], formats: Mapping[str, WeightQuant] | None = None) -> Any:
    """The compressed-tensors ``QuantizationConfig`` equivalent to ``scheme`` (targets every Linear not in ``ignore``);
    ``formats``: ``{name: format}`` of the Linears on another int format than ``scheme.weight`` (one group per format)."""
    check_expressible(scheme)
    a = scheme.activation
    inputs = (
        None
        if a.bits is None
        else QuantizationArgs(
            num_bits=a.bits,
            type="int",
            symmetric=True,
            dynamic=True,
            strategy="token" if a.granularity is ActGranularity.TOKEN else "tensor",
        )
    )
    by_format: dict[WeightQuant, list[str]] = {}
    for name, spec in sorted((formats or {}).items()):
        check_expressible(dataclasses.replace(scheme, weight=spec))
        by_format.setdefault(spec, []).append(name)
    # named groups first: compressed-tensors resolves exact names before classes either way, but warns of "unmatched" targets listed after a class one
    groups = [(names, spec) for spec, names in sorted(by_format.items(), key=lambda kv: kv[0].label)] + [(["Linear"], scheme.weight)]
    config_groups = {f"group_{i}": QuantizationScheme(targets=t, weights=weight_args(w), input_activations=inputs) for i, (t, w) in enumerate(groups)}
    return QuantizationConfig(config_groups=config_groups, ignore=ignore, format=FORMAT, quantization_status="frozen")


def reference_activation_quant(x: torch.Tensor, spec: ActQuant) -> torch.Tensor:
    """compressed-tensors' Python dynamic symmetric fake quantization: ``scale = max|x| / (2^(b-1) - 0.5)``,
    codes clamped to ``[-2^(b-1), 2^(b-1) - 1]`` (so the largest value is clipped by half a step)."""
    if spec.bits is None:
        return x
    half = 2 ** (spec.bits - 1)
    amax = x.abs().amax(-1, keepdim=True) if spec.granularity is ActGranularity.TOKEN else x.abs().amax()
    scale = torch.where(amax > 0, amax / (half - 0.5), torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), -half, half - 1) * scale


def to_float_linears(model: torch.nn.Module) -> dict[str, QuantLinear]:
    """Replace every ``QuantLinear`` by a plain Linear holding its grid weights; returns the removed layers by name."""
    removed = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, q in removed.items():
        lin = torch.nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, dtype=q.weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(q.weight)
            if q.bias is not None:
                lin.bias.copy_(q.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)
    return removed


def write_packed(
    model: torch.nn.Module, tokenizer: Any, scheme: QuantScheme, formats: Mapping[str, WeightQuant], out: Path, float_dtype: torch.dtype
) -> list[str]:
    """Turn ``model`` (with ``QuantLinear`` layers) into a packed compressed-tensors folder at ``out``, every tensor
    that stays float in ``float_dtype`` (``export.float_dtype``; the fp16 scales stay fp16).

    ``formats``: the Linears off ``scheme.weight`` (``fakequant.off_scheme_formats``, read before this call). Consumes
    ``model`` (its Linears are replaced and compressed in place). Returns the quantized names."""
    check_expressible(scheme)
    if any(q.input_scale is not None for q in model.modules() if isinstance(q, QuantLinear)):
        raise ExportError(
            "the post-pass smoothed inputs that no norm produces (explicit input scales), which compressed-tensors cannot carry; "
            "re-run `qaft quantize` with postpass.smoothing.fold_only=true, or use reconstructor whiten"
        )
    layers = to_float_linears(model)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in layers)
    apply_quantization_config(model, quantization_config(scheme, ignore, formats), show_progress=False)
    with torch.no_grad():
        for name, q in layers.items():
            mod = model.get_submodule(name)
            chosen = getattr(mod, "quantization_scheme", None)
            if chosen is None or chosen.weights != weight_args(q.spec):
                raise ExportError(f"compressed-tensors did not select {name} for {q.spec.label}; its ignore/targets rules disagree with quant.targets/ignore")
            scale = stored_scale(q.scale, q.spec).reshape(mod.weight_scale.shape).to(SCALE_DTYPE)
            mod.weight_scale = torch.nn.Parameter(scale, requires_grad=False)  # the library made it in the model's dtype
            if q.zero is not None:  # unsigned → signed zero points (see module docstring)
                mod.weight_zero_point.copy_((q.zero.to(torch.int32) - 2 ** (q.spec.bits - 1)).reshape(mod.weight_zero_point.shape))
    logger.disable("compressed_tensors")  # it warns that W4A8 would infer int-quantized (8-bit storage): we want packed
    try:
        compressor = ModelCompressor.from_pretrained_model(model, quantization_format=FORMAT)
        compressor.compress_model(model)
    finally:
        logger.enable("compressed_tensors")
    compressor.remove_decompression_hook(model)  # the model is written, not run
    with torch.no_grad():
        for name, t in model.named_parameters():  # what the files hold (buffers such as rope's inv_freq are recomputed)
            if t.dtype in FLOATS and not name.endswith("weight_scale"):
                t.data = t.data.to(float_dtype)
    model.config.dtype = float_dtype  # what `from_pretrained(..., dtype="auto")` loads it as
    model.save_pretrained(out)
    compressor.update_config(str(out))
    if not loads_compressed(scheme, bool(formats)):
        dequantize_on_load(out / "config.json")
    tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return sorted(layers)


def loads_compressed(scheme: QuantScheme, mixed: bool) -> bool:
    """Whether ``from_pretrained`` must take the compressed route (per-module schemes; de-compressed after loading):
    with activation quantization (the de-compressing route drops it) or several weight formats (transformers 5.24's
    de-compressing route unpacks every dense Linear with one config group's arguments, ``get_dense_scheme``)."""
    return scheme.activation.bits is not None or mixed


def dequantize_on_load(config: Path) -> None:
    """``quantization_config.dequantize: true`` (weight-only, one format: ``loads_compressed``): transformers' ``from_pretrained`` then
    de-compresses the packed Linears while loading, so ``PeftModel.from_pretrained(base, "adapter")`` finds the
    ``.weight`` it wraps and the card's two lines work as written (without it the packed modules have no
    ``weight`` and peft stops); it also reads asymmetric schemes, which the compressed route cannot (see
    ``load_packed``). Not for activation-quantized schemes: that route drops the dynamic input quantization
    (measured: 0.08 logit difference), so their card de-compresses after loading instead. Only transformers'
    loader reads the key; the packed tensors, and what a server (vLLM) reads, are unchanged."""
    data = json.loads(config.read_text())
    data["quantization_config"]["dequantize"] = True
    config.write_text(json.dumps(data, indent=2) + "\n")


def load_packed(folder: Path) -> torch.nn.Module:
    """Load a ``pack-quantized`` folder with compressed-tensors' own decompression, without transformers' quantizer.

    Why: in transformers 5.24 + compressed-tensors 0.20, ``from_pretrained``'s compressed route (the one that
    keeps activation quantization; weight-only exports take the de-compressing one, ``dequantize_on_load``)
    cannot load *asymmetric* packed checkpoints. Before loading, transformers compresses an empty (meta) model to learn the
    tensor layout, and the library's meta path leaves ``weight_zero_point`` unpacked ``[out, groups]``
    while real checkpoints store it packed along rows (``[out·b/32, groups]``), so loading stops with a
    size mismatch. Here each module's tensors go through ``PackedQuantizationCompressor.decompress``
    (which unpacks the zero point correctly); the modules keep their quantization scheme, so dynamic
    activation quantization still applies in forward, as it would after ``from_pretrained``."""
    config = AutoConfig.from_pretrained(folder)
    qdict = dict(getattr(config, "quantization_config", None) or {})
    if qdict.get("format") != FORMAT:
        raise ExportError(f"{folder}/config.json: quantization_config.format is {qdict.get('format')!r}, expected {FORMAT!r}")
    del config.quantization_config
    qconfig = QuantizationConfig.model_validate({k: v for k, v in qdict.items() if k in QuantizationConfig.model_fields})
    qconfig.quantization_status = QuantizationStatus.FROZEN
    with no_init_weights():  # every tensor is loaded below
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # float32 compute whatever the files store
    apply_quantization_config(model, qconfig, show_progress=False)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(str(f))
    with torch.no_grad():
        for name, mod in model.named_modules():
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            prefix = f"{name}."
            own = {k[len(prefix) :]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix) :]]}
            dense = PackedQuantizationCompressor.decompress(own, scheme)
            mod.weight.copy_(dense["weight"])
            mod.weight_scale.copy_(dense["weight_scale"])
            if "weight_zero_point" in dense and hasattr(mod, "weight_zero_point"):
                mod.weight_zero_point.copy_(dense["weight_zero_point"])
            if "bias" in own:
                mod.bias.copy_(own["bias"])
            mod.quantization_status = QuantizationStatus.DECOMPRESSED
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [
        k
        for k in missing
        if not any(k.endswith(s) for s in (".weight", ".weight_scale", ".weight_zero_point", ".bias"))
        or not hasattr(model.get_submodule(k.rpartition(".")[0]), "quantization_scheme")
    ]
    if model.config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ExportError(f"{folder}: checkpoint does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()
