"""A drop-in Linear that computes ``y = Q_a(x) Q(W)ᵀ + b + (x Bᵀ) Aᵀ``: the deployed layer, simulated in float.

The weight is stored already de-quantized (the grid values), activations are fake-quantized
dynamically per token when the scheme asks for it, and the low-rank correction reads the
*unquantized* input, as a LoRA adapter beside a quantized kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grid import QuantizedWeight, fake_quant_activation
from .lowrank import Correction
from .scheme import ActQuant

STORED = ("codes", "scale", "zero", "bias", "lora_A", "lora_B", "input_scale")
"""The buffers that define the layer; ``weight`` is derived from codes and scale (kept for speed)."""


class QuantLinear(torch.nn.Module):
    def __init__(self, q: QuantizedWeight, bias: torch.Tensor | None, act: ActQuant, correction: Correction | None, input_scale: torch.Tensor | None = None):
        super().__init__()
        weight = q.dequant
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act = act
        self.act_fn = fake_quant_activation
        """How activations are rounded: a server's convention; ``ctpack.reference_activation_quant`` swaps in compressed-tensors' for parity checks."""
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("codes", q.codes.detach().clone())
        self.register_buffer("scale", q.scale.detach().clone())
        self.register_buffer("zero", None if q.zero is None else q.zero.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # PEFT's orientation: lora_A is applied first (our B, [k, in]), lora_B second (our A, [out, k])
        has = correction is not None and correction.rank > 0
        self.register_buffer("lora_A", correction.B.detach().clone() if has else None)
        self.register_buffer("lora_B", correction.A.detach().clone() if has else None)
        # 1/f of activation smoothing when it could not be folded into a preceding norm (``[in]``)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        y = F.linear(self.act_fn(x, self.act), self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B)
        return y

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, act_bits={self.act.bits}, rank={rank}"
