"""GGUF files for llama.cpp users: the quantized model and the low-rank factors as a LoRA adapter.

    model-<TYPE>.gguf       the model in its llama.cpp architecture (``ggufarch``); quantized Linears in the scheme's GGUF type
    adapter-lowrank.gguf    ``general.type = adapter``, ``adapter.type = lora``; apply with
                            ``llama-cli -m model-Q4_0.gguf --lora adapter-lowrank.gguf``

Choices (llama.cpp's converter, ``convert_hf_to_gguf.py`` with its default ``--outtype f16``, is the
model): tensor names, metadata and the architecture's conventions (Llama's q/k row permutation, Gemma's norm
offset ...) from ``ggufarch``; 1-D tensors (norms, biases) F32; 2-D float tensors (embeddings, an untied
``output.weight``, Linears the scheme ignores) in ``export.gguf_float_type`` (F16 by default).
Block packing is the ``gguf`` package's (``gguf.quants.quantize``), never ours: our Linear holds
values on the type's grid, and ``quantize`` of a grid value reproduces it exactly for RTN results
(``quantized`` checks every tensor and names the layer when a block would be re-rounded, as GPTQ's
blocks can be when their extreme did not get the extreme code).

The tokenizer is copied field by field from the source GGUF when the model came from one, and
built from the Hugging Face tokenizer otherwise: byte-level BPE as ``tokenizer.ggml.model = gpt2``,
SentencePiece-style (BPE with byte fallback) as ``llama`` (``_build_tokenizer``).

LoRA adapter: ``<tensor>.lora_a`` ``[rank, in]`` and ``<tensor>.lora_b`` ``[out, rank]`` (q/k rows
permuted like their weight). The file holds one ``adapter.lora.alpha`` and llama.cpp scales each tensor by
``alpha / rank``, so with per-layer ranks (a bits budget) each ``lora_b`` carries ``rank / alpha`` folded in.
``alpha`` is the *smallest* rank, so that factor is ≥ 1 (1 wherever the ranks are equal: exact): folded the other
way, a rank-1 layer's ``lora_b`` would shrink by up to the largest rank and land in F16's subnormals. The folded
``lora_b`` is rounded to F16 once more than the factors were (``stored_factors`` gives the values the file holds).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from qaft.core.errors import ExportError
from qaft.core.text import bos_of
from qaft.quant.fakequant import QuantLinear
from qaft.quant.scheme import GGUFType, QuantScheme

from .ggufarch import architecture, check_tensors, write_metadata

FILE_TYPES = {
    GGUFType.Q4_0: "MOSTLY_Q4_0",
    GGUFType.Q4_1: "MOSTLY_Q4_1",
    GGUFType.Q5_0: "MOSTLY_Q5_0",
    GGUFType.Q5_1: "MOSTLY_Q5_1",
    GGUFType.Q8_0: "MOSTLY_Q8_0",
    GGUFType.MXFP4: "MOSTLY_MXFP4_MOE",
}
"""``general.file_type`` of each type (llama.cpp names its only MXFP4 file type ``_MOE``)."""

ADAPTER_FILE = "adapter-lowrank.gguf"


def model_file(t: GGUFType) -> str:
    return f"model-{t.value}.gguf"


def check_config(config: Any, scheme: QuantScheme, model_class: str) -> None:
    """What the model's config and the scheme must be for GGUF files (``qaft doctor`` runs this too, before any compute):
    a llama.cpp architecture qaft writes, a name there for every tensor, weight-only quantization."""
    del model_class  # the architecture, not the class, decides
    check_tensors(config)
    if scheme.activation.bits is not None:
        raise ExportError(
            f"quant.activation.bits: {scheme.activation.bits}, but llama.cpp picks activation precision itself; "
            "export a weight-only scheme (quant.activation.bits=null) to GGUF"
        )


def check_model(model: torch.nn.Module, scheme: QuantScheme) -> None:
    """Refuse, before writing anything, what the GGUF files cannot carry."""
    check_config(model.config, scheme, type(model).__name__)
    scaled = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.input_scale is not None]
    if scaled:
        raise ExportError(
            f"{scaled[0]} (and {len(scaled) - 1} more) has an explicit input scale (ASER smoothing with no norm to fold into), "
            "which GGUF cannot hold; use postpass.smoothing.fold_only=true"
        )


def quantized(name: str, values: torch.Tensor, t: GGUFType) -> np.ndarray:
    """Packed blocks of ``values`` (already on the grid) by ``gguf.quants``, checked to decode to them exactly."""
    qtype = gguf.GGMLQuantizationType[t.value]
    array = values.detach().to(torch.float32).contiguous().numpy()
    packed = gguf.quants.quantize(array, qtype)
    back = gguf.quants.dequantize(packed, qtype)
    changed = int((back != array).sum())
    if changed:
        raise ExportError(
            f"{name}: gguf would re-round {changed} of {array.size} weights (a block whose largest weight does not sit on the "
            f"type's extreme code, which GPTQ can produce); llama.cpp files only hold round-to-nearest blocks: "
            "use postpass.quantizer=rtn for a GGUF export"
        )
    return packed


def _float(t: torch.Tensor, float_type: str) -> np.ndarray:
    array = t.detach().to(torch.float32).contiguous().numpy()
    return array if t.dim() == 1 or float_type == "F32" else array.astype(np.float16)


def _copy_tokenizer(writer: Any, source: Path) -> None:
    """Every ``tokenizer.*`` field of the source GGUF, with its stored types."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype is gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def _build_tokenizer(writer: Any, tok: Any) -> None:
    """The Hugging Face tokenizer as llama.cpp's: a byte-level BPE one as its ``gpt2`` model (tokens, merges), a
    SentencePiece-style one (BPE with byte fallback: Llama 2, Mistral, Gemma, Phi-3) as its ``llama`` model (tokens
    with scores and types from gguf-py's ``LlamaHfVocab``, as llama.cpp's converter reads ``tokenizer.json``); then
    the special ids and whether BOS starts the input."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    model, pre = backend.get("model", {}), json.dumps(backend.get("pre_tokenizer"))
    if model.get("type") == "BPE" and "ByteLevel" in pre:
        _byte_level_vocab(writer, tok, model)
    elif model.get("type") == "BPE" and model.get("byte_fallback"):
        _sentencepiece_vocab(writer, tok)
    else:
        raise ExportError(
            f"tokenizer: {type(tok).__name__} is neither a byte-level BPE nor a SentencePiece-style (byte-fallback BPE) tokenizer, "
            "and the model did not come from a GGUF to copy one from; GGUF export needs one of the three"
        )
    for key, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id), ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(bos_of(tok) is not None)  # llama.cpp's tools start their input with BOS only when this is set


def _byte_level_vocab(writer: Any, tok: Any, model: dict[str, Any]) -> None:
    n = len(tok)
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tok.convert_ids_to_tokens(list(range(n))))
    writer.add_token_types([3 if i in special else 1 for i in range(n)])  # 3 CONTROL, 1 NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:  # GGUF has no empty arrays, and llama.cpp refuses a gpt2 vocabulary without this key
        raise ExportError(f"tokenizer: {type(tok).__name__} has no BPE merges; llama.cpp cannot load a byte-level vocabulary without them")
    writer.add_token_merges(merges)


def _sentencepiece_vocab(writer: Any, tok: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tokens = list(gguf.LlamaHfVocab(Path(tmp)).all_tokens())
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([text for text, _, _ in tokens])
    writer.add_token_scores([score for _, score, _ in tokens])
    writer.add_token_types([int(kind) for _, _, kind in tokens])


def write_model(model: torch.nn.Module, tok: Any, scheme: QuantScheme, path: Path, *, source_gguf: Path | None, float_type: str, name: str) -> dict[str, str]:
    """The model GGUF; returns ``{gguf tensor name: ggml type}``."""
    t, config = scheme.weight.gguf_type, model.config
    arch = architecture(config)
    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_type(gguf.GGUFType.MODEL)
    write_metadata(writer, config, arch, name)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[t]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _copy_tokenizer(writer, source_gguf) if source_gguf is not None else _build_tokenizer(writer, tok)

    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    types: dict[str, str] = {}
    for hf_name, tensor in model.state_dict().items():
        owner, _, leaf = hf_name.rpartition(".")
        if owner in qlinears and leaf != "bias":
            continue  # codes, scales and factors: the weight is written from the module below
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        g = arch.gguf_name(hf_name)
        array = _float(arch.to_file(g, hf_name, tensor), float_type)
        writer.add_tensor(g, array)
        types[g] = "F32" if array.dtype == np.float32 else "F16"
    for hf_name, m in qlinears.items():
        g = arch.gguf_name(f"{hf_name}.weight")
        own = m.spec.gguf_type  # per tensor: postpass.budget_formats may have chosen another GGUF type than the scheme's
        writer.add_tensor(g, quantized(hf_name, arch.permute(g, m.weight), own), raw_dtype=gguf.GGMLQuantizationType[own.value])
        types[g] = own.value
    _write(writer)
    return types


def adapter_alpha(ranks: Iterable[int]) -> int:
    """The file's one ``adapter.lora.alpha``: the smallest rank (module docstring)."""
    return min(ranks)


def stored_factors(model: torch.nn.Module) -> None:
    """Round every factor pair of ``model`` in place to what ``write_adapter``'s file holds and ``read_adapter`` gives
    back: ``lora_b · rank / alpha`` in F16, times ``alpha / rank`` (the export's parity reference)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.lora_A is not None]
    if not layers:
        return
    alpha = adapter_alpha(m.lora_A.shape[0] for m in layers)
    with torch.no_grad():
        for m in layers:
            rank = m.lora_A.shape[0]
            m.factors_to_fp16()
            m.lora_B.copy_((m.lora_B * (rank / alpha)).half().float() * (alpha / rank))


def write_adapter(model: torch.nn.Module, path: Path) -> dict[str, int]:
    """The LoRA adapter GGUF of every quantized Linear with factors; returns ``{gguf tensor name: rank}`` (empty: no file)."""
    arch = architecture(model.config)
    factors = {arch.gguf_name(f"{n}.weight"): (m.lora_A, m.lora_B) for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.lora_A is not None}
    if not factors:
        return {}
    alpha = adapter_alpha(a.shape[0] for a, _ in factors.values())
    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for g, (a, b) in factors.items():
        rank = a.shape[0]
        b = arch.permute(g, b) * (rank / alpha)  # llama.cpp scales by alpha / rank: fold it back where a layer's rank is lower
        writer.add_tensor(f"{g}.lora_a", a.detach().half().contiguous().numpy())  # F16, as the budget counts factors
        writer.add_tensor(f"{g}.lora_b", b.detach().half().contiguous().numpy())  # (llama.cpp's own converter's default)
    _write(writer)
    return {g: a.shape[0] for g, (a, _) in factors.items()}


def _write(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_adapter(path: Path, model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{hf module name: (lora_A [k, in], lora_B [out, k] at scale 1)}`` back from an adapter GGUF (q/k rows un-permuted)."""
    reader = gguf.GGUFReader(path)
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    tensors = {r.name: torch.from_numpy(np.array(r.data, dtype=np.float32)) for r in reader.tensors}
    arch = architecture(model.config, check=False)  # names only: a reload's config may lack what the export checked
    tmap = arch.name_map()
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, QuantLinear)):  # a reloaded float model, or qaft's quantized one
            continue
        g = tmap.get_name(f"{name}.weight", try_suffixes=(".weight",))
        if g is None or f"{g}.lora_a" not in tensors:
            continue
        a, b = tensors[f"{g}.lora_a"], tensors[f"{g}.lora_b"]
        out[name] = (a, arch.unpermute(g, b) * (alpha / a.shape[0]))
    return out
