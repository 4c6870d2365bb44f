"""qaft's own quantized-model folder: integer codes, scales and low-rank factors in safetensors.

Layout (written atomically: ``.tmp-<name>`` then renamed)::

    model.safetensors   float tensors of everything not quantized (embeddings, norms, head) and, for each
                        quantized Linear ``<name>``: <name>.codes (int16), .scale, [.zero], [.bias], [.input_scale],
                        [.lora_A ``[k, in]``, .lora_B ``[out, k]``: PEFT's names and orientation, scaling 1]
    config.json         the Hugging Face model config (rebuilds the architecture offline)
    tokenizer files
    qaft_quant.json     format version, scheme, method, rank, calibration, per-layer telemetry, quantized names,
                        [layer_formats: the Linears on another format than the scheme's (postpass.budget_formats)]

De-quantized weights are not stored: ``load_quantized`` rebuilds them from codes and scales
(exactly, see ``grid.dequantize``). This folder is the input of ``qaft export`` (and ``qaft tune``)
and a checkpoint of the post-pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights

from qaft.core.errors import CheckpointError
from qaft.core.io import ensure_writable, staged
from qaft.core.typed import parse, to_plain

from .fakequant import STORED, QuantLinear, factors_to_fp16, off_scheme_formats
from .grid import QuantizedWeight, dequantize
from .lowrank import Correction
from .scheme import QuantScheme, WeightQuant

META = "qaft_quant.json"
FORMAT_VERSION = 1


def write_quantized(model: torch.nn.Module, tokenizer: Any, folder: Path, scheme: QuantScheme, meta: dict[str, Any]) -> None:
    """Write the files of a quantized folder into ``folder`` (which exists); ``save_quantized`` does it atomically."""
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not names:
        raise CheckpointError("nothing to save: the model has no quantized layers")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    derived = {f"{n}.weight" for n in names}
    narrow = {f"{n}.codes": torch.int16 for n in names}  # held narrow (fakequant.narrow_codes)
    narrow |= {f"{n}.{f}": torch.float16 for n in names for f in ("lora_A", "lora_B")}  # factors in fp16, as exported
    factors_to_fp16(model)  # the caller's model becomes the one saved, bit for bit
    for key, t in model.state_dict().items():
        if key in derived or t.data_ptr() in seen:  # de-quantized weights are rebuilt; tied tensors stored once
            continue
        seen.add(t.data_ptr())
        tensors[key] = t.to(narrow.get(key, t.dtype)).detach().contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    model.config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {"format_version": FORMAT_VERSION, "scheme": to_plain(scheme), "quantized": names, **meta}
    formats = {n: to_plain(spec) for n, spec in off_scheme_formats(model, scheme.weight).items()}
    if formats:  # postpass.budget_formats: Linears on another format than the scheme's
        record["layer_formats"] = formats
    (folder / META).write_text(json.dumps(record, indent=2))


def save_quantized(model: torch.nn.Module, tokenizer: Any, path: str | Path, scheme: QuantScheme, meta: dict[str, Any], *, overwrite: bool) -> Path:
    out = Path(path)
    ensure_writable(out, overwrite, key="postpass.output_dir")
    with staged(out) as tmp:
        write_quantized(model, tokenizer, tmp, scheme, meta)
    return out


def read_codes(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The integer codes of the quantized Linears ``names`` in the folder ``path``, read alone (``qaft tune`` does
    not hold the frozen codes while it trains, and takes them back from its source to write the result)."""
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        return {name: f.get_tensor(f"{name}.codes") for name in names}


def _open(path: Path) -> Any:
    """The folder's safetensors, opened to be read tensor by tensor (one layer's codes at a time, never all at once)."""
    try:
        return safe_open(str(path), "pt")
    except Exception as e:  # SafetensorError (cut short, bad header), OSError
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{path} is damaged ({why}); write it again with `qaft quantize --overwrite`") from None


def load_quantized(path: str | Path, *, weights: bool = True) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Rebuild the fake-quantized model from a folder written by ``save_quantized``: ``(model, tokenizer, meta)``.

    The architecture is built without storage (its tensors come from the file) and the quantized Linears one at a
    time, so the peak is about the loaded model itself. ``weights=False`` leaves every ``QuantLinear`` holding its
    codes only (``QuantLinear.release_weight``: for a caller that stores them otherwise, e.g. ``qaft tune``)."""
    p = Path(path)
    if not (p / META).is_file():
        raise CheckpointError(f"{p} is not a qaft quantized folder (no {META}); create one with `qaft quantize`")
    meta = json.loads((p / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p / META}: format_version {meta.get('format_version')!r}, this qaft reads {FORMAT_VERSION}")
    scheme = parse(QuantScheme, meta["scheme"], "scheme")
    with no_init_weights(), init_empty_weights():  # parameters without storage: every one is assigned below
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(p))
    with _open(p / "model.safetensors") as f:
        formats = {n: parse(WeightQuant, spec, f"layer_formats.{n}") for n, spec in meta.get("layer_formats", {}).items()}
        missing, unexpected = _assign(model, f, meta["quantized"], scheme, formats, weights)
    if missing or unexpected:
        raise CheckpointError(f"{p}/model.safetensors does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), AutoTokenizer.from_pretrained(p), meta


def _assign(
    model: torch.nn.Module, f: Any, quantized: list[str], scheme: QuantScheme, formats: dict[str, WeightQuant], weights: bool
) -> tuple[list[str], list[str]]:
    """Put the file's tensors into ``model`` (a ``QuantLinear`` for each of ``quantized``, on its entry of ``formats``
    or else the scheme's, the rest by name); returns the names the model lacks and the file's names it does not know."""
    keys = set(f.keys())
    for name in quantized:
        codes, scale, zero, bias, lora_a, lora_b, input_scale = (f.get_tensor(k) if (k := f"{name}.{t}") in keys else None for t in STORED)
        keys -= {f"{name}.{t}" for t in STORED}
        spec = formats.get(name, scheme.weight)
        q = QuantizedWeight(codes, scale, zero, dequantize(codes, scale, zero, spec))
        parent, _, leaf = name.rpartition(".")
        corr = None if lora_a is None else Correction(A=lora_b.float(), B=lora_a.float())  # PEFT names → our A [out, k], B [k, in]
        lin = QuantLinear(q, bias, scheme.activation, corr, input_scale, spec=spec)
        if not weights:
            lin.release_weight()
        setattr(model.get_submodule(parent), leaf, lin)
    # copies: a tensor read from the file is a view of its memory map, and one of them would keep every page of the
    # file that was read (all the codes) resident for as long as the model lives
    missing, unexpected = model.load_state_dict({k: f.get_tensor(k).clone() for k in keys}, strict=False, assign=True)
    built = set(quantized)  # their buffers were set above, from the file
    missing = [k for k in missing if k.rpartition(".")[0] not in built]
    if model.config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    return missing, unexpected
