"""``export.format: gguf``: the model and the factors as llama.cpp files (``gguffile``), read back, proven to hold our model.

    export/
      model-<TYPE>.gguf       llama-architecture model, quantized Linears in the scheme's GGUF type
      adapter-lowrank.gguf    the factors as a llama.cpp LoRA adapter (scale 1)


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
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import gguf
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from qaft.core.errors import ExportError, QaftError
from qaft.core.model import ModelConfig, resolve
from qaft.quant.fakequant import QuantLinear
from qaft.quant.scheme import GGUFType, QuantScheme, WeightFormat, WeightQuant
from qaft.runtimes import llamacpp as llamacpp_runtime

from . import llamacpp
from .card import made_with, mb, perplexity_section, provenance_note
from .config import ExportConfig
from .formats import FORMATS, ExportFormat
from .gguffile import ADAPTER_FILE, check_config, check_model, model_file, read_adapter, stored_factors, write_adapter, write_model
from .parity import PROMPTS, Parity, compare_to, enforce, logits_of, prompt_ids, round_as_stored
from .sizes import size_record


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
    folder = Path(folder)
    name = model_file(gguf_type_of(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if adapter and (folder / ADAPTER_FILE).is_file():
        model = LowRank(model, read_adapter(folder / ADAPTER_FILE, model)).eval()
    return model, tok


def source_gguf(name_or_path: str) -> Path | None:
    """The GGUF file the model came from: itself, or through a training run's ``final/config.yaml``."""
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
    """A copy of ``reference`` with its float 2-D tensors (unless F32) and its factors rounded as the files store them."""
    rounded = copy.deepcopy(reference)
    stored_factors(rounded)
    if float_type != "F32":
        round_as_stored(rounded, torch.float16, lambda name, t, quantized: not quantized and t.dim() >= 2)
    return rounded


def expected_logits(reference: torch.nn.Module, tok: Any, settings: ExportConfig, adapter: bool) -> dict[str, list[torch.Tensor]]:
    """What the files must reload to, per check (``model``: factors off; ``model+adapter``), from ``reference`` with its
    floats rounded as stored. Computed before the reload, so the rounded copy is gone when the reloaded model arrives."""
    prompts, ref = prompt_ids(tok), stored_floats(reference, settings.gguf_float_type)
    with factors_off(ref):
        out = {"model": logits_of(ref, prompts)}
    if adapter:
        out["model+adapter"] = logits_of(ref, prompts)
    return out


def check_parity(
    reloaded: tuple[torch.nn.Module, Any], expected: dict[str, list[torch.Tensor]], tok: Any, settings: ExportConfig
) -> tuple[dict[str, Any], bool]:
    """``({check: Parity}, tokenizer agrees)`` of ``reloaded`` (``load_gguf`` of the files) against ``expected``
    (``expected_logits``); a difference above ``export.parity_atol`` is an error."""
    prompts = prompt_ids(tok)
    loaded, loaded_tok = reloaded
    same_tokens = all(tok(p, add_special_tokens=False)["input_ids"] == loaded_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS)
    results = {}
    for check, logits in expected.items():
        with loaded.disable_adapter() if check == "model" and isinstance(loaded, LowRank) else nullcontext():
            diff, top1 = compare_to(logits, loaded, prompts)
        enforce(f"GGUF {check}", diff, top1, settings.parity_atol, "transformers/gguf")
        results[f"gguf {check} (transformers)"] = Parity(diff, top1, tolerance=settings.parity_atol)
    return results, same_tokens


def sizes(folder: Path, reference: torch.nn.Module, t: GGUFType) -> dict[str, Any]:
    """``size_record`` of the two files: packed bytes from each tensor's type's block size (``gguf.GGML_QUANT_SIZES``)."""

    def packed(m: QuantLinear) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[m.spec.gguf_type.value]]  # type: ignore[union-attr]
        return m.weight.numel() // block * type_size

    adapter = folder / ADAPTER_FILE
    adapter_bytes = adapter.stat().st_size if adapter.is_file() else 0
    return size_record(
        reference,
        packed_bytes=sum(packed(m) for m in reference.modules() if isinstance(m, QuantLinear)),
        base_bytes=(folder / model_file(t)).stat().st_size,
        adapter_bytes=adapter_bytes,
        factor_bytes=adapter_bytes,
    )


@FORMATS.register
class GGUF(ExportFormat):
    name = "gguf"
    summary = "llama.cpp model + LoRA adapter files"
    consumes_model = False  # the writers read the model's codes, scales and factors; nothing is packed in place

    @classmethod
    def native(cls, scheme: QuantScheme) -> bool:
        return scheme.weight.format is WeightFormat.GGUF

    @classmethod
    def check_scheme(cls, scheme: QuantScheme) -> None:
        if scheme.weight.format is not WeightFormat.GGUF:
            raise ExportError(
                f"export.format: gguf files hold llama.cpp's block grids, and this result is {scheme.weight.label}; quantize with "
                "quant.weight.format=gguf quant.weight.gguf_type=Q4_0 (or Q4_1, Q5_0, Q5_1, Q8_0, MXFP4), or use export.format=compressed-tensors"
            )

    @classmethod
    def check_model_config(cls, config: Any, scheme: QuantScheme, model_class: str) -> None:
        check_config(config, scheme, model_class)

    menu_fix = "give postpass.budget_formats GGUF types only (e.g. {format: gguf, gguf_type: Q8_0})"

    @classmethod
    def holds(cls, spec: WeightQuant) -> bool:
        """Any GGUF type: llama.cpp's types are per tensor (mixed files)."""
        return spec.format is WeightFormat.GGUF

    @classmethod
    def check_model(cls, model: torch.nn.Module, scheme: QuantScheme) -> None:
        super().check_model(model, scheme)
        check_model(model, scheme)

    def write(
        self, tmp: Path, model: torch.nn.Module, reference: torch.nn.Module, tokenizer: Any, scheme: QuantScheme, meta: dict[str, Any], settings: ExportConfig
    ) -> dict[str, Any]:
        t = scheme.weight.gguf_type
        source = source_gguf(meta["source_model"])
        types = write_model(
            model,
            tokenizer,
            scheme,
            tmp / model_file(t),
            source_gguf=source,
            float_type=settings.gguf_float_type,
            name=f"{Path(str(meta['source_model'])).name} {scheme.label} + {meta['method']}",
        )
        ranks = write_adapter(model, tmp / ADAPTER_FILE)
        quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        expected = expected_logits(reference, tokenizer, settings, adapter=bool(ranks))
        parity, same_tokens = check_parity(self.reload(tmp), expected, tokenizer, settings)
        return {
            "format": {
                "model": f"GGUF {t.value} ({model_file(t)})",
                "adapter": f"GGUF LoRA ({ADAPTER_FILE})" if ranks else None,
                "gguf_type": t.value,
                "float_type": settings.gguf_float_type,
                "tokenizer": f"copied from {source.name}" if source else "built from the Hugging Face tokenizer (byte-level BPE)",
                "tokenizer_roundtrip": same_tokens,
            },
            "ranks": ranks,
            "quantized_modules": quantized,
            "tensor_types": types,
            "parity": {k: asdict(v) for k, v in parity.items()},
            "sizes": sizes(tmp, reference, t),
        }

    @classmethod
    def owns(cls, folder: Path) -> bool:
        return any(folder.glob("model-*.gguf"))

    @classmethod
    def load(cls, folder: Path, **options: Any) -> tuple[torch.nn.Module, Any]:
        return load_gguf(folder)

    runtime = "llama.cpp"

    @classmethod
    def runtime_missing(cls) -> str | None:
        return llamacpp_runtime.missing()

    @classmethod
    def runtime_check(cls, folder: Path, windows: torch.Tensor | None, reloaded: tuple[torch.nn.Module, Any]) -> dict[str, Any]:
        """llama.cpp on both files: its perplexity rows (``llama.cpp``, ``llama.cpp+adapter``) and greedy agreement."""
        adapter = folder / ADAPTER_FILE
        return llamacpp.check(*reloaded, folder / model_file(gguf_type_of(folder)), adapter if adapter.is_file() else None, windows)

    @classmethod
    def card(cls, m: dict[str, Any]) -> str:
        """Files, how llama.cpp and transformers load them, parity, sizes."""
        f, s, p = m["format"], m["sizes"], m["parity"]
        model, adapter = f"model-{f['gguf_type']}.gguf", "adapter-lowrank.gguf" if f["adapter"] else None
        lines = [
            "---",
            "tags: [qaft, gguf, llama.cpp, lora]",
            "---",
            "",
            *made_with(m, f"`{model}`, llama.cpp {f['gguf_type']}", f"`{adapter}`, llama.cpp LoRA adapter, scale 1" if adapter else "no adapter"),
            *perplexity_section(m),
            "## Size",
            "",
            f"`{model}` {mb(s['base_bytes'])}"
            + (f" + `{adapter}` {mb(s['adapter_bytes'])}" if adapter else "")
            + f" (float32 {mb(s['float32_bytes'])}). Quantized Linears: {s['bits_per_weight_base']:.2f} bits per weight"
            + (f", {s['bits_per_weight_with_adapter']:.2f} with the adapter" if adapter else "")
            + f". Norms F32; embeddings and other float matrices {f['float_type']}. Tokenizer {f['tokenizer']}.",
            "",
            "## Reload parity",
            "",
            "Logits of the files reloaded by transformers' GGUF loader (which de-quantizes with the `gguf` package, llama.cpp's rules), "
            "the adapter's factors read back with `gguf.GGUFReader`, vs qaft's in-memory model with its float matrices rounded as stored:",
            "",
            "| check | max abs diff | top-1 agreement |",
            "|---|---|---|",
            *(f"| {k} | {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:g}) | {v['top1_agreement']:.1%} |" for k, v in p.items()),
            "",
            "## Load",
            "",
            "```sh",
            f"llama-cli -m {model}" + (f" --lora {adapter}" if adapter else "") + ' -p "The capital of France is"',
            "```",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer  # needs: pip install gguf",
            f'model = AutoModelForCausalLM.from_pretrained(".", gguf_file="{model}")  # de-quantized to float',
            f'tokenizer = AutoTokenizer.from_pretrained(".", gguf_file="{model}")',
            "```",
            "",
            ('transformers does not read GGUF LoRA adapters; `qaft.load_quantized(".")` attaches the factors to the reloaded model. ' if adapter else "")
            + provenance_note(),
            "",
            *(["## llama.cpp", "", *llamacpp.card_lines(m["runtime_check"])] if m.get("runtime_check") else []),
        ]
        return "\n".join(lines)
