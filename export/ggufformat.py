"""``qaft export`` with ``export.format: gguf``: write the two GGUF files, read them back, prove they hold our model.

Parity: the model file is reloaded by transformers (``from_pretrained(dir, gguf_file=...)``, which
de-quantizes with the ``gguf`` package, i.e. llama.cpp's rules) and compared with qaft's in-memory
model with its low-rank factors off; the adapter file is read back with ``gguf.GGUFReader``, its
factors are attached to the reloaded model (``LowRank``), and the pair is compared with the full
in-memory model. The float tensors of the in-memory model are rounded the way the file stores them
(``export.gguf_float_type``) for the comparison, so the tolerance ``export.parity_atol`` measures the
export, not the storage type; the effect of F16 storage shows in the perplexity rows instead.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import yaml

from qaft.trainer.config import Config, ModelConfig
from qaft.core.errors import ExportError, QaftError

from qaft.quant.fakequant import QuantLinear
from .gguffile import ADAPTER_FILE, model_file, read_adapter, write_adapter, write_model
from qaft.quant.scheme import GGUFType, QuantScheme


class LowRank(torch.nn.Module):
    """A reloaded model plus low-rank factors ``y += (x Aᵀ) Bᵀ`` on named Linears, via forward hooks
    (what llama.cpp's ``--lora`` computes); ``disable_adapter()`` turns them off, as peft's does."""

    def __init__(self, model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.model, self.enabled = model, True
        for name, (a, b) in factors.items():
            model.get_submodule(name).register_forward_hook(self._hook(a, b))

    def _hook(self, a: torch.Tensor, b: torch.Tensor):
        def add(module, args, out):
            return out + F.linear(F.linear(args[0], a.to(out.dtype)), b.to(out.dtype)) if self.enabled else out
        return add

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def gguf_type_of(folder: Path) -> GGUFType:
    files = sorted(folder.glob("model-*.gguf"))
    if not files:
        raise ExportError(f"{folder}: no model-<TYPE>.gguf file; write one with `qaft export CONFIG export.format=gguf`")
    return GGUFType(files[0].stem.removeprefix("model-"))


def load_gguf(folder: str | Path, *, adapter: bool = True) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` from a GGUF export through transformers' own GGUF loader; with the adapter
    file's factors attached (a ``LowRank``) when there is one and ``adapter`` is true."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    name = model_file(gguf_type_of(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if adapter and (folder / ADAPTER_FILE).is_file():
        model = LowRank(model, read_adapter(folder / ADAPTER_FILE, model)).eval()
    return model, tok


def source_gguf(name_or_path: str) -> Path | None:
    """The GGUF file the model came from: itself, or through a training run's ``final/config.yaml``."""
    from qaft.core.model import resolve

    run_config = Path(name_or_path) / "config.yaml"
    if run_config.is_file():
        name = (yaml.safe_load(run_config.read_text()).get("model") or {}).get("name_or_path")
        return source_gguf(name) if name else None
    try:
        src = resolve(ModelConfig(name_or_path=name_or_path))
    except QaftError:
        return None
    return Path(src.location) / src.gguf_file if src.gguf_file else None


@contextmanager
def factors_off(model: torch.nn.Module) -> Iterator[None]:
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    saved = [(m.lora_A, m.lora_B) for m in layers]
    for m in layers:
        m.lora_A = m.lora_B = None
    try:
        yield
    finally:
        for m, (a, b) in zip(layers, saved):
            m.lora_A, m.lora_B = a, b


def stored_floats(reference: torch.nn.Module, float_type: str) -> torch.nn.Module:
    """``reference`` with its float 2-D tensors rounded as the file stores them (a copy; itself for F32)."""
    if float_type == "F32":
        return reference
    rounded = copy.deepcopy(reference)
    with torch.no_grad():
        for module in rounded.modules():
            if isinstance(module, QuantLinear):
                continue
            for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                if t.dim() >= 2 and t.is_floating_point():
                    t.copy_(t.half().float())
    return rounded


def check_parity(folder: Path, reference: torch.nn.Module, tok: Any, cfg: Config) -> tuple[dict[str, Any], bool]:
    """``({check: Parity}, tokenizer agrees)``; a difference above ``export.parity_atol`` is an error."""
    from .exporter import PROMPTS, Parity, compare_logits

    prompts = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    loaded, loaded_tok = load_gguf(folder)
    same_tokens = all(tok(p, add_special_tokens=False)["input_ids"] == loaded_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS)
    ref = stored_floats(reference, cfg.export.gguf_float_type)
    results = {}
    adapter = isinstance(loaded, LowRank)
    checks = {"model": (factors_off(ref), loaded.disable_adapter() if adapter else nullcontext())}
    if adapter:
        checks["model+adapter"] = (nullcontext(), nullcontext())
    for check, (ours, theirs) in checks.items():
        with ours, theirs:
            diff, top1 = compare_logits(ref, loaded, prompts)
        if not diff <= cfg.export.parity_atol:
            raise ExportError(f"GGUF reload parity failed ({check}): max |logit diff| {diff:.3g} > export.parity_atol {cfg.export.parity_atol:g} "
                              f"(top-1 agreement {top1:.1%}); this is a bug in qaft or in the installed transformers/gguf, please report it")
        results[f"gguf {check} (transformers)"] = Parity(diff, top1, tolerance=cfg.export.parity_atol)
    return results, same_tokens


def sizes(folder: Path, reference: torch.nn.Module, t: GGUFType) -> dict[str, Any]:
    """``size_record`` of the two files: packed bytes from the type's block size (``gguf.GGML_QUANT_SIZES``)."""
    import gguf

    from .exporter import size_record

    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.value]]
    quantized = sum(m.weight.numel() for m in reference.modules() if isinstance(m, QuantLinear))
    adapter = folder / ADAPTER_FILE
    adapter_bytes = adapter.stat().st_size if adapter.is_file() else 0
    return size_record(reference, packed_bytes=quantized // block * type_size, base_bytes=(folder / model_file(t)).stat().st_size,
                       adapter_bytes=adapter_bytes, factor_bytes=adapter_bytes)


def write_gguf(cfg: Config, tmp: Path, model: torch.nn.Module, reference: torch.nn.Module, tok: Any, scheme: QuantScheme,
               meta: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Both files into ``tmp``, parity-checked and measured: the format-specific part of the manifest."""
    from .exporter import evaluate

    t = scheme.weight.gguf_type
    source = source_gguf(meta["source_model"])
    types = write_model(model, tok, scheme, tmp / model_file(t), source_gguf=source, float_type=cfg.export.gguf_float_type,
                        name=f"{Path(str(meta['source_model'])).name} {scheme.label} + {meta['method']}")
    ranks = write_adapter(model, tmp / ADAPTER_FILE)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    parity, same_tokens = check_parity(tmp, reference, tok, cfg)
    return {
        "format": {"model": f"GGUF {t.value} ({model_file(t)})", "adapter": f"GGUF LoRA ({ADAPTER_FILE})" if ranks else None,
                   "gguf_type": t.value, "float_type": cfg.export.gguf_float_type,
                   "tokenizer": f"copied from {source.name}" if source else "built from the Hugging Face tokenizer (byte-level BPE)",
                   "tokenizer_roundtrip": same_tokens},
        "ranks": ranks, "quantized_modules": quantized, "tensor_types": types,
        "parity": {k: asdict(v) for k, v in parity.items()}, "sizes": sizes(tmp, reference, t),
        "evaluation": evaluate(cfg, tmp, progress) if cfg.export.evaluate else None,  # export.evaluate reads GGUF folders via load_gguf
    }
