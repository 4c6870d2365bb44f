"""A drop-in Linear that computes ``y = Q_a(x) Q(W)ᵀ + b + (x Bᵀ) Aᵀ``: the deployed layer, simulated in float.

The weight is stored already de-quantized (the grid values), activations are fake-quantized
dynamically per token when the scheme asks for it, and the low-rank correction reads the
*unquantized* input, as a LoRA adapter beside a quantized kernel does.

The factors and the scales are parameters that do not require grad: ``qaft tune`` switches them on
(``trainable``) and trains them with the codes frozen. While the scales train, the weight is
recomputed from codes and scales in every forward; the activation rounding passes gradients straight
through (identity), so layers below still receive them. ``release_weight`` lets go of the de-quantized
weight altogether (block-wise tuning: 1 byte per weight held instead of 4; the forward recomputes it,
the same values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .grid import QuantizedWeight, dequantize, fake_quant_activation
from .lowrank import Correction
from .scheme import ActQuant, WeightQuant

STORED = ("codes", "scale", "zero", "bias", "lora_A", "lora_B", "input_scale")
"""The tensors that define the layer; ``weight`` is derived from codes and scale (kept for speed)."""


def deployed_input(
    x: torch.Tensor, input_scale: torch.Tensor | None, act: ActQuant, act_fn: Callable[[torch.Tensor, ActQuant], torch.Tensor] = fake_quant_activation
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, Q_a(x))`` as a deployed Linear sees its input: after any smoothing scale, and rounded as ``act`` says
    (``act_fn``), the rounding straight through (its value, the identity's gradient). The base path reads ``Q_a(x)``,
    the low-rank correction ``x``."""
    if input_scale is not None:
        x = x * input_scale
    xq = act_fn(x, act)
    if x.requires_grad and act.bits is not None:
        xq = x + (xq - x).detach()
    return x, xq


def narrow_codes(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes in the narrowest type that holds them: int8 (or uint8 for unsigned 8-bit grids) for every
    grid qaft writes, half of the int16 the grids compute in; only ``dequantize`` reads them in memory, and the
    store writes int16 whatever they are held in."""
    lo, hi = int(codes.min()), int(codes.max())
    for dtype in (torch.int8, torch.uint8):
        if torch.iinfo(dtype).min <= lo and hi <= torch.iinfo(dtype).max:
            return codes.to(dtype)
    return codes


def _frozen(t: torch.Tensor | None) -> torch.nn.Parameter | None:
    return None if t is None else torch.nn.Parameter(t.detach().clone(), requires_grad=False)


class QuantLinear(torch.nn.Module):
    def __init__(
        self,
        q: QuantizedWeight,
        bias: torch.Tensor | None,
        act: ActQuant,
        correction: Correction | None,
        input_scale: torch.Tensor | None = None,
        *,
        spec: WeightQuant,
    ):
        super().__init__()
        self.spec = spec
        """The weight grid (for recomputing the weight from trained scales)."""
        weight = q.dequant
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act = act
        self.act_fn = fake_quant_activation
        """How activations are rounded: a server's convention; ``ctpack.reference_activation_quant`` swaps in compressed-tensors' for parity checks."""
        self.register_buffer("weight", weight.detach().clone())
        self._released_dtype = weight.dtype
        self.register_buffer("codes", narrow_codes(q.codes.detach().clone()))
        self.scale = _frozen(q.scale)
        self.register_buffer("zero", None if q.zero is None else q.zero.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # PEFT's orientation: lora_A is applied first (our B, [k, in]), lora_B second (our A, [out, k])
        has = correction is not None and correction.rank > 0
        self.register_parameter("lora_A", _frozen(correction.B) if has else None)
        self.register_parameter("lora_B", _frozen(correction.A) if has else None)
        # 1/f of activation smoothing when it could not be folded into a preceding norm (``[in]``)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, xq = deployed_input(x, self.input_scale, self.act, self.act_fn)
        w = self.dequantized() if self.weight is None or self.scale.requires_grad else self.weight
        y = F.linear(xq, w, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return y

    @torch.no_grad()
    def factors_to_fp16(self) -> None:
        """Round the factors to fp16 values (kept in their dtype): how qaft's folder and both exports store them and
        the bits budget counts them, so the model in memory is the one on disk."""
        for p in (self.lora_A, self.lora_B):
            if p is not None:
                p.copy_(p.half().to(p.dtype))

    @torch.no_grad()
    def truncate(self, rank: int) -> None:
        """Keep the first ``rank`` components of the correction (the reconstructors order them by importance); 0 drops it."""
        if self.lora_A is None or rank >= self.lora_A.shape[0]:
            return
        if rank == 0:
            self.lora_A = self.lora_B = None
            return
        self.lora_A = _frozen(self.lora_A[:rank])
        self.lora_B = _frozen(self.lora_B[:, :rank])

    def dequantized(self) -> torch.Tensor:
        """``[out, in]`` the grid values of the codes under the current scales (differentiable in the scales)."""
        return dequantize(self.codes, self.scale, self.zero, self.spec).to(self.weight_dtype)

    @torch.no_grad()
    def refresh_weight(self, dtype: torch.dtype | None = None) -> None:
        """Recompute ``weight`` from codes and scales (after the scales changed: ``weight`` is what evaluation and the
        exports read), optionally stored in ``dtype``: bf16 while tuning under bf16 autocast, where every matmul
        casts it to bf16 anyway and autograd would keep each cast for the backward (half the memory, same products)."""
        self.weight = dequantize(self.codes, self.scale, self.zero, self.spec).to(dtype or self.weight_dtype)

    @property
    def weight_dtype(self) -> torch.dtype:
        """The de-quantized weight's dtype, also while ``release_weight`` holds none."""
        return self._released_dtype if self.weight is None else self.weight.dtype

    def release_weight(self) -> None:
        """Hold only the codes: every forward de-quantizes them (``refresh_weight`` stores the weight again). Worth it
        where few layers keep their weight for the backward at once (a forward without grad keeps none)."""
        self._released_dtype = self.weight_dtype
        self.weight = None

    def extra_repr(self) -> str:
        rank = 0 if self.lora_A is None else self.lora_A.shape[0]
        return f"in={self.in_features}, out={self.out_features}, act_bits={self.act.bits}, rank={rank}"


def factors_to_fp16(model: torch.nn.Module) -> None:
    """``QuantLinear.factors_to_fp16`` on every quantized Linear of ``model``."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.factors_to_fp16()


def off_scheme_formats(model: torch.nn.Module, weight: WeightQuant) -> dict[str, WeightQuant]:
    """``{name: format}`` of the quantized Linears not on ``weight`` (the ones ``postpass.budget_formats`` moved)."""
    return {n: m.spec for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.spec != weight}
