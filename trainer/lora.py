"""LoRA attachment through peft: ``lora`` mirrors ``peft.LoraConfig``."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from qaft.core.errors import ModelError

from .config import LoraSection


def attach_lora(model: PreTrainedModel, cfg: LoraSection) -> torch.nn.Module:
    """Wrap ``model`` in a peft LoRA model; a target list that matches nothing is a ModelError naming real modules."""
    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    lcfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(
            f"lora.target_modules: {targets} matches no module of this model ({str(e).splitlines()[0][:120]}); Linear layers here: {', '.join(linear)}"
        ) from None
