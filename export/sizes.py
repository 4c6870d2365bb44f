"""The manifest's ``sizes``, one shape for every format: bytes on disk and effective bits per quantized weight."""

from __future__ import annotations

from typing import Any

import torch

from qaft.quant.fakequant import QuantLinear

NOT_WEIGHTS = ("codes", "scale", "zero", "lora_A", "lora_B", "input_scale")
"""``QuantLinear`` buffers that are storage or correction, not a weight of the float model."""


def parameter_count(reference: torch.nn.Module) -> int:
    """Weights of the model as a float checkpoint would hold them (tied tensors once; no codes, scales or factors)."""
    seen, params = set(), 0
    for name, t in list(reference.named_parameters()) + list(reference.named_buffers()):
        if t.data_ptr() in seen or name.rpartition(".")[2] in NOT_WEIGHTS:
            continue
        seen.add(t.data_ptr())
        params += t.numel()
    return params


def size_record(reference: torch.nn.Module, *, packed_bytes: int, base_bytes: int, adapter_bytes: int, factor_bytes: int) -> dict[str, Any]:
    """``packed_bytes``: codes + scales [+ zeros] of the quantized Linears; ``factor_bytes``: the low-rank factors as stored."""
    params = parameter_count(reference)
    quantized = sum(m.weight.numel() for m in reference.modules() if isinstance(m, QuantLinear))
    return {
        "parameters": params,
        "quantized_weights": quantized,
        "float32_bytes": 4 * params,
        "bfloat16_bytes": 2 * params,
        "base_bytes": base_bytes,
        "adapter_bytes": adapter_bytes,
        "bits_per_weight_base": 8 * packed_bytes / quantized,
        "bits_per_weight_with_adapter": 8 * (packed_bytes + factor_bytes) / quantized,
    }
