"""The ``export`` config section (a leaf: ``format`` is checked against the registry of ``formats`` by the root config,
so that this module and ``formats``, which takes these settings, import one way)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from qaft.core.typed import Gt


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Used by ``qaft export``."""

    format: str = "auto"
    """``compressed-tensors`` (packed checkpoint + PEFT adapter) or ``gguf`` (llama.cpp model + LoRA adapter files); ``auto`` = ``gguf`` for ``quant.weight.format: gguf`` schemes, else ``compressed-tensors``."""
    float_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """compressed-tensors only: how every tensor that stays float (embeddings, norms, an untied head, biases, ignored Linears) is stored; float32 doubles a large vocabulary's share of the files (the model card says what each part takes)."""
    gguf_float_type: Literal["F16", "F32"] = "F16"
    """GGUF only: how 2-D tensors that stay float (embeddings, untied ``output``, ignored Linears) are stored; norms are always F32."""
    dir: str | None = None
    """Where ``qaft export`` writes; null = ``<training.output_dir>/export``. Reads the post-pass result from ``postpass.output_dir``."""
    parity_atol: Annotated[float, Gt(0.0)] = 1e-3
    """Largest |logit difference| allowed between the reloaded export (transformers + peft) and the in-memory model, activation quantization off on both sides."""
    evaluate: bool = True
    """Perplexity of the float model, the packed base and base + adapter on the ``eval`` protocol, into the manifest and model card (skipped when ``eval.path`` is null)."""
    runtime_check: Literal["auto", "required", "skip"] = "auto"
    """Run the files in the program users deploy them with (GGUF: llama.cpp): load, greedy generation vs the reload, its perplexity rows when ``evaluate``. ``auto``: when installed (`make setup`), else recorded as skipped; ``required``; ``skip``."""
    runtime_ppl_rtol: Annotated[float, Gt(0.0)] = 0.02
    """Largest relative gap between the runtime's perplexity and transformers' reload's, same files and windows (with ``evaluate``); beyond it the export fails, nothing published. llama.cpp's 8-bit activations: up to 0.5 % measured (SmolLM2, Q4_0)."""
