"""A drop-in Linear that computes ``y = Q_a(x) Q(W)ᵀ + b + (x Bᵀ) Aᵀ``: the deployed layer, simulated in float.

The weight is stored already de-quantized (the grid values), activations are fake-quantized
dynamically per token when the scheme asks for it, and the low-rank correction reads the
*unquantized* input, as a LoRA adapter beside a quantized kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .lowrank import Correction
from .rtn import fake_quant_activation
from .scheme import ActQuant


class QuantLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act: ActQuant, correction: Correction | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act = act
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("lora_A", None if correction is None or correction.rank == 0 else correction.A.detach().clone())
        self.register_buffer("lora_B", None if correction is None or correction.rank == 0 else correction.B.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(fake_quant_activation(x, self.act), self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_B), self.lora_A)
        return y

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[1]
        return f"in={self.in_features}, out={self.out_features}, act_bits={self.act.bits}, rank={rank}"
