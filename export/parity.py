"""Reload parity: the logits of files read back by their runtime vs qaft's in-memory model, on fixed prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from qaft.core.errors import ExportError
from qaft.quant.fakequant import QuantLinear

PROMPTS = (
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "In 1066, William the Conqueror landed in England and",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Quantization maps each weight to the nearest point of a grid, so",
)
"""Fixed parity prompts: prose, a continuation, code, and the domain."""


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float
    """Largest |logit difference| over every prompt position, activation quantization off on both sides."""
    top1_agreement: float
    act_max_abs_diff: float | None = None
    """With activation quantization on, ours rounding as compressed-tensors does (enforced too)."""
    server_act_max_abs_diff: float | None = None
    """With ours rounding as a server does (``max|x| / 127``): the convention gap, reported only."""
    server_act_top1_agreement: float | None = None
    tolerance: float = 0.0


def prompt_ids(tokenizer: Any) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]


@torch.no_grad()
def logits_of(model: torch.nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each prompt's logits (float32), to compare against later without keeping ``model``."""
    return [model(input_ids=ids[None]).logits[0].float() for ids in prompts]


@torch.no_grad()
def compare_to(expected: list[torch.Tensor], b: torch.nn.Module, prompts: list[torch.Tensor]) -> tuple[float, float]:
    """``(max |logit difference|, top-1 agreement)`` of ``b`` against ``expected`` (``logits_of``) over every position."""
    worst, agree, total = 0.0, 0, 0
    for la, ids in zip(expected, prompts, strict=True):
        lb = b(input_ids=ids[None]).logits[0].float()
        worst = max(worst, (la - lb).abs().max().item())
        agree += (la.argmax(-1) == lb.argmax(-1)).sum().item()
        total += ids.numel()
    return worst, agree / total


def compare_logits(a: torch.nn.Module, b: torch.nn.Module, prompts: list[torch.Tensor]) -> tuple[float, float]:
    """``(max |logit difference|, top-1 agreement)`` of two models over every prompt position."""
    return compare_to(logits_of(a, prompts), b, prompts)


def enforce(check: str, diff: float, top1: float, tolerance: float, runtime: str) -> None:
    """The parity gate: beyond ``export.parity_atol`` the export fails and nothing is published."""
    if not diff <= tolerance:
        raise ExportError(
            f"reload parity failed ({check}): max |logit diff| {diff:.3g} > export.parity_atol {tolerance:g} "
            f"(top-1 agreement {top1:.1%}); this is a bug in qaft or in the installed {runtime}, please report it"
        )


def round_as_stored(model: torch.nn.Module, dtype: torch.dtype, stored: Callable[[str, torch.Tensor, bool], bool]) -> None:
    """Round in place, to ``dtype`` and back, every float parameter that ``stored(name, tensor, in_a_quantized_linear)``
    says the files hold in ``dtype``: a parity reference then differs from the reloaded files by the export alone, not by
    the storage type (whose effect shows in the perplexity rows). Parameters only: buffers such as rope's ``inv_freq``
    are recomputed on load."""
    with torch.no_grad():
        for module in model.modules():
            quantized = isinstance(module, QuantLinear)
            for name, t in module.named_parameters(recurse=False):
                if t.is_floating_point() and stored(name, t, quantized):
                    t.copy_(t.to(dtype).to(t.dtype))
