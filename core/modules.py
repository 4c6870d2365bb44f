"""Where things are in a causal LM: the decoder blocks, and replacing a submodule by its dotted name."""

from __future__ import annotations

from typing import Any

import torch


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder blocks (``model.layers`` in Llama, ``model.decoder.layers`` in OPT), with its dotted name."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.endswith("layers") and len(mod) > 0:
            return name, mod
    raise ValueError("found no decoder layer list (a ModuleList named '*layers'); this architecture is not supported yet")


def set_submodule(root: torch.nn.Module, dotted: str, new: torch.nn.Module) -> None:
    """``root.<dotted> = new``."""
    parent, _, leaf = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def hidden_states(y: Any) -> torch.Tensor:
    """A decoder layer's output hidden states (some transformers versions return them in a tuple)."""
    return y[0] if isinstance(y, tuple) else y
