"""Which llama.cpp architecture a Hugging Face model is written as, and what its files need beyond tensor names.

Tensor names and the set of tensors each architecture may hold come from gguf-py's own tables
(``gguf.TensorNameMap``, ``gguf.MODEL_TENSORS``); the architecture is the one whose name is the model's
``model_type`` (``qwen2`` → ``QWEN2``), except where llama.cpp's converter (``convert_hf_to_gguf.py``)
writes a family under another name (``mistral`` → ``llama``, ``gemma3_text`` → ``gemma3``). What the
converter does to the tensors and metadata beyond that is a ``Convention`` per architecture:

- Llama / Mistral: q/k rows permuted to llama.cpp's rotary layout (HF interleaves the halves differently).
- Gemma 2 / 3: every ``*norm.weight`` stored + 1 (HF's Gemma RMSNorm multiplies by 1 + w, llama.cpp's by w);
  the embedding scale √d is llama.cpp's own, nothing to write; logit soft-capping, the sliding window, its period
  (llama.cpp holds "every p-th layer attends fully", so another ``layer_types`` pattern is refused) and the local
  layers' rope base. llama.cpp scales attention by 1/√head_dim (27B: 1/√(d/heads)),
  so a config whose ``query_pre_attn_scalar`` says otherwise is refused.
- Qwen2 / Qwen3: q/k/v biases and q/k norms map by name; nothing else.
- Phi-3: fused ``qkv_proj`` and ``gate_up_proj`` map to ``attn_qkv`` / ``ffn_up`` as they are (llama.cpp splits
  them); the rotary dimensions and the original context length.

The generic metadata follows the converter's base class. Rope scaling other than none or ``linear`` (yarn,
longrope, llama3's frequency tensor) is refused: qaft does not write it yet.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import torch

from qaft.core.errors import ExportError


def _swa_period(config: Any) -> int | None:
    """``p`` when every ``p``-th layer attends fully and the others slide (the only pattern llama.cpp's Gemma files hold);
    None without sliding layers; 0 for any other pattern."""
    kinds = list(getattr(config, "layer_types", None) or [])
    if "sliding_attention" not in kinds:
        return None
    full = [i for i, k in enumerate(kinds) if k == "full_attention"]
    p = full[0] + 1 if full else len(kinds) + 1
    return p if all((k == "full_attention") == ((i + 1) % p == 0) for i, k in enumerate(kinds)) else 0


def _gemma(n_layers_27b: int) -> Callable[[Any], str | None]:
    """Gemma's check: the window pattern llama.cpp holds, and its attention scale (1/sqrt(head_dim); 27B, told apart by
    its layer count: 1/sqrt(d/heads)) equal to the config's ``query_pre_attn_scalar``."""

    def check(config: Any) -> str | None:
        if _swa_period(config) == 0:
            return f"layer_types {list(config.layer_types)} is not one full-attention layer every p layers, the pattern llama.cpp holds"
        ours = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == n_layers_27b else config.head_dim
        if not math.isclose(config.query_pre_attn_scalar, ours):
            return f"query_pre_attn_scalar {config.query_pre_attn_scalar}, where llama.cpp scales attention by 1/sqrt({ours:g})"
        return None

    return check


def _gemma_window(writer: Any, config: Any) -> None:
    period = _swa_period(config)
    if period is None:
        return
    writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern(period)
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention", {}).get("rope_theta")
    if local is not None:
        writer.add_rope_freq_base_swa(float(local))


def _phi3(writer: Any, config: Any) -> None:
    rope = rope_parameters(config)
    original = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
    writer.add_rope_scaling_orig_ctx_len(int(original or config.max_position_embeddings))
    writer.add_sliding_window(int(config.sliding_window or 0))  # 0: no sliding window (llama.cpp's converter's rule)


@dataclass(frozen=True)
class Convention:
    """What llama.cpp's converter does for one architecture beyond mapping tensor names (module docstring)."""

    rotary_permute: bool = False
    norm_offset: float = 0.0
    check: Callable[[Any], str | None] | None = None
    """Why a config of this architecture cannot be written, or None."""
    extra: Callable[[Any, Any], None] | None = None
    """Metadata beyond the generic keys: ``extra(writer, config)``."""


CONVENTIONS: dict[gguf.MODEL_ARCH, Convention] = {
    gguf.MODEL_ARCH.LLAMA: Convention(rotary_permute=True),
    gguf.MODEL_ARCH.QWEN2: Convention(),
    gguf.MODEL_ARCH.QWEN3: Convention(),
    gguf.MODEL_ARCH.GEMMA2: Convention(norm_offset=1.0, check=_gemma(46), extra=_gemma_window),
    gguf.MODEL_ARCH.GEMMA3: Convention(norm_offset=1.0, check=_gemma(62), extra=_gemma_window),
    gguf.MODEL_ARCH.PHI3: Convention(extra=_phi3),
}
"""The architectures qaft writes, each tested through llama.cpp itself (tests/test_llamacpp.py)."""

RENAMED = {"mistral": "llama", "gemma3_text": "gemma3"}
"""``model_type``s llama.cpp's converter writes under another architecture's name."""
ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def written_types() -> list[str]:
    """The ``model_type``s the GGUF export writes (for messages and the README)."""
    names = {gguf.MODEL_ARCH_NAMES[a] for a in CONVENTIONS}
    return sorted(names | {t for t, a in RENAMED.items() if a in names})


@dataclass(frozen=True)
class Architecture:
    """A model's llama.cpp architecture, its convention and the shape facts the tensors need."""

    arch: gguf.MODEL_ARCH
    convention: Convention
    n_blocks: int
    n_head: int
    n_head_kv: int

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def name_map(self) -> Any:
        return gguf.get_tensor_name_map(self.arch, self.n_blocks)

    def gguf_name(self, hf_name: str) -> str:
        tmap = self.name_map()
        name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        kind = tmap.get_type(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None or kind not in gguf.MODEL_TENSORS[self.arch]:
            raise ExportError(
                f"{hf_name}: llama.cpp's {self.name} architecture has no tensor for it (gguf.TensorNameMap); export.format=compressed-tensors writes this model"
            )
        return name

    def _heads(self, name: str) -> int | None:
        if not self.convention.rotary_permute:
            return None
        return self.n_head if ".attn_q." in name else self.n_head_kv if ".attn_k." in name else None

    def to_file(self, gguf_name: str, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """A float tensor (or a factor's rows) as the file holds it: q/k rows permuted, Gemma's norms + 1."""
        t = self.permute(gguf_name, t)
        return t + self.convention.norm_offset if self.convention.norm_offset and hf_name.endswith("norm.weight") else t

    def permute(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """llama.cpp's rotary row order for ``attn_q`` / ``attn_k`` rows where the convention asks for it."""
        h = self._heads(name)
        return rows if h is None else rows.reshape(h, 2, rows.shape[0] // h // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)

    def unpermute(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        h = self._heads(name)
        return rows if h is None else rows.reshape(h, rows.shape[0] // h // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_parameters(config: Any) -> dict[str, Any]:
    """The full-attention layers' rope parameters (transformers keeps one dict per layer type for Gemma 3)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return rope.get("full_attention", rope)


def architecture(config: Any, *, check: bool = True) -> Architecture:
    """The llama.cpp architecture of ``config``, or one ``ExportError`` naming what is missing and what is written.
    ``check=False`` skips the refusals that concern computing with the files (reading an adapter's names needs none)."""
    model_type = config.model_type
    arch = ARCH_BY_NAME.get(RENAMED.get(model_type, model_type))
    fix = f"the GGUF export writes {', '.join(written_types())}; export.format=compressed-tensors writes any model"
    if arch is None:
        raise ExportError(f"export.format: gguf: llama.cpp has no architecture for model_type {model_type!r}; {fix}")
    if arch not in CONVENTIONS:
        raise ExportError(f"export.format: gguf: llama.cpp's {gguf.MODEL_ARCH_NAMES[arch]!r} architecture is not written by qaft yet; {fix}")
    convention = CONVENTIONS[arch]
    why = convention.check(config) if convention.check and check else None
    rope_type = rope_parameters(config).get("rope_type", rope_parameters(config).get("type", "default"))
    if why is None and check and rope_type not in ("default", "linear", None):
        why = f"rope scaling {rope_type!r} is not written by qaft yet"
    if why:
        raise ExportError(f"export.format: gguf: {model_type}: {why}; export.format=compressed-tensors writes this model")
    heads = config.num_attention_heads
    return Architecture(arch, convention, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads)


def check_tensors(config: Any) -> None:
    """Every tensor of the model ``config`` builds has a name in its llama.cpp architecture (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    arch = architecture(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name in model.state_dict():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        arch.gguf_name(name)


def write_metadata(writer: Any, config: Any, arch: Architecture, name: str) -> None:
    """The hyperparameters llama.cpp reads, as its converter's base class writes them, plus the convention's extras."""
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(arch.n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(arch.n_head)
    writer.add_head_count_kv(arch.n_head_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // arch.n_head
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    rope = rope_parameters(config)
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    writer.add_rope_dimension_count(int(partial * head_dim))
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope.get("rope_type", rope.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping), ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(config, key, None):
            add(float(getattr(config, key)))
    if arch.convention.extra:
        arch.convention.extra(writer, config)
    writer.add_vocab_size(config.vocab_size)
