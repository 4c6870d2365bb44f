"""The low-rank reconstruction factors as a standard PEFT LoRA adapter.

``QuantLinear`` already holds them in PEFT's names and orientation (``lora_A = B [k, in]``,
``lora_B = A [out, k]``). PEFT scales the product by ``lora_alpha / r``; we set ``lora_alpha = r``
per layer (``alpha_pattern`` beside ``rank_pattern``) so the scaling is exactly 1 for every rank.
The config is written by peft's own ``LoraConfig.save_pretrained``; the weights under the keys
``PeftModel.from_pretrained`` reads (``base_model.model.<name>.lora_{A,B}.weight``).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from qaft.quant.fakequant import QuantLinear

WEIGHTS = "adapter_model.safetensors"


def ranks(model: torch.nn.Module) -> dict[str, int]:
    """Rank of the correction of every quantized Linear that has one."""
    return {n: m.lora_A.shape[0] for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.lora_A is not None}


def write_adapter(model: torch.nn.Module, out: Path, base_name_or_path: str) -> dict[str, int] | None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` to ``out``; None (and nothing written) without factors."""
    per_layer = ranks(model)
    if not per_layer:
        return None
    r = Counter(per_layer.values()).most_common(1)[0][0]
    odd = {n: k for n, k in per_layer.items() if k != r}
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=sorted(per_layer),
        rank_pattern=odd,
        alpha_pattern=odd,
        base_model_name_or_path=base_name_or_path,
    )
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear) and mod.lora_A is not None:
            tensors[f"base_model.model.{name}.lora_A.weight"] = mod.lora_A.detach().half().contiguous()  # fp16, as the budget counts
            tensors[f"base_model.model.{name}.lora_B.weight"] = mod.lora_B.detach().half().contiguous()  # them (exact: the folder holds fp16 values)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    return per_layer
