"""Where things are in a causal LM: the decoder blocks, and replacing a submodule by its dotted name."""

from __future__ import annotations

from typing import Any

import torch

from .errors import ModelError

SUPPORTED = "Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, OPT and other models with `model.layers` of nn.Linear"
"""What ``decoder_layers`` accepts, in words (its refusal and the README name it)."""


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks (``model.layers`` in Llama, ``model.decoder.layers`` in OPT), with its dotted name."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod) > 0:
            return name, mod
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    found = f"its blocks are `{max(lists, key=lambda x: len(x[1]))[0]}`" if lists else "it has no list of blocks"
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        found += ", with Conv1D (transposed) weights"
    raise ModelError(
        f"{type(model).__name__}: {found}, not a ModuleList named '*layers' of nn.Linear; qaft supports {SUPPORTED} (GPT-2-style "
        "`transformer.h` models are not supported yet)"
    )


def set_submodule(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    """``root.<dotted> = new``."""
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def hidden_states(y: Any) -> torch.Tensor:
    """A decoder layer's output hidden states (some transformers versions return them in a tuple)."""
    return y[0] if isinstance(y, tuple) else y
