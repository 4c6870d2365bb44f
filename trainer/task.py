"""What the loop trains: the model it builds, the loss it minimises, how its state and its result are saved.

``FineTune`` is ``qaft train``'s task: a LoRA adapter on the float model, the model's own
cross-entropy, peft adapters in checkpoints, and ``final/`` = the merged model + the adapter.
``tune.Distill`` (``qaft tune``) trains a quantized model's low-rank factors against the float
model. ``loop.train`` is the same for both: optimizer, schedule, accumulation, callbacks,
checkpoints and resume do not know which task they run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from qaft.core.errors import ConfigError
from qaft.core.logits import Head, lm_outputs
from qaft.core.model import load_model_and_tokenizer

from .checkpoint import PEFT_ADAPTER, Trainable
from .config import TrainConfig, TrainingConfig
from .lora import attach_lora
from .schedule import build_scheduler


def enable_gradient_checkpointing(model: torch.nn.Module, key: str) -> None:
    """Recompute each decoder layer in the backward (transformers' own, non-reentrant: no input needs grad)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{key}: {type(model).__name__} does not support gradient checkpointing in transformers; set {key}=false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns and goes in v6
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Task:
    """Base class: ``qaft train``'s LoRA fine-tuning unless a subclass says otherwise."""

    verb: ClassVar[str] = "qaft train"
    trainable: ClassVar[Trainable] = PEFT_ADAPTER
    """What checkpoints save and resume restores."""

    def check(self, cfg: TrainConfig, accelerator: Any) -> None:
        """Refuse, before the model loads, what this task cannot run (a launch, a callback)."""

    def build(self, cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
        """``(model with exactly the trained parameters requiring grad, tokenizer)``."""
        raise NotImplementedError

    def ready(self, accelerator: Any) -> None:
        """Called once accelerate prepared the model: move what the task keeps beside it to its device."""

    def param_groups(self, model: torch.nn.Module, t: TrainingConfig) -> list[dict[str, Any]]:
        """AdamW's parameter groups: every trainable parameter at ``training.learning_rate``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def scheduler(self, opt: torch.optim.Optimizer, t: TrainingConfig, max_steps: int) -> Any:
        """The learning-rate schedule (``training.lr_scheduler_type`` over the run)."""
        return build_scheduler(opt, t, max_steps)

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], step: int) -> Any:
        """The training forward of optimizer step ``step`` (0-based); ``loss`` reads its outputs. The next-token loss
        in chunks of positions (``core.logits``): the whole logits are made only if a callback reads them."""
        return lm_outputs(model, batch["input_ids"])

    def loss(self, batch: dict[str, torch.Tensor], outputs: Any) -> torch.Tensor:
        """The task's loss for one micro-batch (logged as ``loss``; callbacks' terms are added to it)."""
        return outputs.loss

    def eval_terms(self, batch: dict[str, torch.Tensor], head: Head) -> dict[str, torch.Tensor]:
        """Extra evaluation metrics, one value per sequence (``[batch]``), averaged over the eval blocks (``head``: the
        model's output head on this batch, ``core.logits.Head``)."""
        return {}

    def write_final(self, model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
        """The result into ``folder`` (main process; ``final/`` once published)."""
        raise NotImplementedError

    def done(self, steps: int, final: Path) -> str:
        return f"{self.verb}: done, {steps} steps; result in {final}"


class FineTune(Task):
    """LoRA fine-tuning of the float model (``qaft train``)."""

    def build(self, cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
        model, tokenizer = load_model_and_tokenizer(cfg.model)
        if cfg.training.gradient_checkpointing:
            enable_gradient_checkpointing(model, "training.gradient_checkpointing")
        return attach_lora(model, cfg.lora), tokenizer

    def write_final(self, model: torch.nn.Module, tokenizer: Any, folder: Path) -> None:
        model.save_pretrained(folder / "adapter")
        merged = model.merge_and_unload()  # training is over: merging in place is fine
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    def done(self, steps: int, final: Path) -> str:
        return f"{self.verb}: done, {steps} steps; merged model and adapter in {final}"
