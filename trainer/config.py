"""The trainer's config sections (``data``, ``lora``, ``training``) and ``TrainConfig``, what one training run reads.

``training`` uses Hugging Face ``TrainingArguments`` names and ``lora`` mirrors ``peft.LoraConfig`` so
users can carry their habits over. ``TrainConfig`` adds the sections owned below the trainer (``model``
from ``core``, ``quant`` from ``quant``, ``callbacks`` from ``callbacks``); the root config of ``qaft``
extends it with the post-pass, export and evaluation sections. A checkpoint stores the ``TrainConfig``
part, and a resume is refused when a key differs that is not marked ``RESUMABLE``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from qaft.callbacks import CALLBACKS
from qaft.core.model import ModelConfig
from qaft.core.registry import Spec
from qaft.core.typed import NO_EFFECT, RESUMABLE, Ge, Gt, Le, flagged_keys, to_plain
from qaft.quant.scheme import QuantScheme

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt")
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str
    """Local text/jsonl/json/parquet/csv file or folder, a hub dataset name, or ``python-docs`` / ``python-docs-train`` / ``python-docs-heldout`` (pydoc's topic texts, which ship with Python; the last two are disjoint)."""
    config_name: str | None = None
    """Hub dataset configuration, e.g. ``wikitext-2-raw-v1``."""
    split: str = "train"
    """Dataset split to read (local files are all ``train``)."""
    text_column: str = "text"
    """Column with the text (ignored for ``.txt`` files, which are read whole)."""
    chat_template: bool = False
    """Render ``messages_column`` (lists of ``{role, content}``) with the tokenizer's chat template."""
    messages_column: str = "messages"
    """Column with chat messages, used when ``chat_template`` is true."""
    block_size: Annotated[int, Ge(8)] = 512
    """Tokens per packed training block (the sequence length)."""
    eval_fraction: Annotated[float, Ge(0.0), Le(0.5)] = 0.05
    """Share of blocks, taken from the end of the corpus, held out for evaluation."""
    max_train_blocks: Annotated[int, Ge(1)] | None = None
    """Keep only the first N training blocks (after the split, before shuffling)."""
    max_eval_blocks: Annotated[int, Ge(1)] | None = None
    """Keep only the first N eval blocks."""
    add_eos: bool = True
    """Append the tokenizer's EOS token after each document before packing."""


@dataclass(frozen=True, kw_only=True)
class LoraSection:
    """Mirrors ``peft.LoraConfig``."""

    r: Annotated[int, Ge(1)] = 8
    """LoRA rank."""
    lora_alpha: Annotated[float, Gt(0.0)] = 16.0
    """Scaling numerator: the update is ``lora_alpha / r · B A``."""
    lora_dropout: Annotated[float, Ge(0.0), Le(0.9)] = 0.0
    """Dropout on the LoRA input; 0 = peft's default. On CPU its random draws are costly (torch's CPU generator makes ~10^8 draws/s): 0.05 costs about a third of a bf16 step on SmolLM2 (``benchmarks/speed.py``)."""
    target_modules: Literal["all-linear"] | tuple[str, ...] = "all-linear"
    """``all-linear`` (every Linear except the output head) or a list of module-name suffixes such as ``[q_proj, v_proj]``."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases to train."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``lora_alpha / sqrt(r)``."""


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Names follow ``transformers.TrainingArguments``."""

    output_dir: str = field(default="runs/qaft", metadata={RESUMABLE: True, NO_EFFECT: True})
    """Where checkpoints, ``metrics.jsonl`` and ``final/`` go."""
    per_device_train_batch_size: Annotated[int, Ge(1)] = 4
    """Blocks per micro-batch on each process."""
    per_device_eval_batch_size: Annotated[int, Ge(1)] = 4
    """Blocks per eval batch on each process."""
    gradient_accumulation_steps: Annotated[int, Ge(1)] = 1
    """Micro-batches per optimizer step."""
    learning_rate: Annotated[float, Gt(0.0)] = 2e-4
    """Peak learning rate of AdamW."""
    max_steps: Annotated[int, Ge(-1)] = field(default=-1, metadata={RESUMABLE: True})
    """Optimizer steps to run; -1 = ``num_train_epochs`` passes over the data."""
    num_train_epochs: Annotated[float, Gt(0.0)] = field(default=1.0, metadata={RESUMABLE: True})
    """Passes over the training blocks when ``max_steps`` is -1."""
    lr_scheduler_type: Literal[SCHEDULERS] = "linear"  # type: ignore[valid-type]
    """Schedule from ``transformers.get_scheduler``."""
    warmup_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 0.0
    """Share of steps with linear warm-up."""
    weight_decay: Annotated[float, Ge(0.0)] = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: Annotated[float, Ge(0.0)] = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    gradient_checkpointing: bool = field(default=False, metadata={RESUMABLE: True})
    """Recompute activations in the backward (~1.4x slower, about half the activation memory; the same gradients)."""
    logging_steps: Annotated[int, Ge(1)] = field(default=10, metadata={RESUMABLE: True, NO_EFFECT: True})
    """Log train metrics every N optimizer steps."""
    eval_steps: Annotated[int, Ge(1)] | None = field(default=None, metadata={RESUMABLE: True})
    """Evaluate every N steps; null = only at the end."""
    eval_on_start: bool = field(default=False, metadata={RESUMABLE: True})
    """Also evaluate before the first step (a baseline for the curve)."""
    save_steps: Annotated[int, Ge(0)] = field(default=500, metadata={RESUMABLE: True})
    """Checkpoint every N steps; 0 = no intermediate checkpoints (``final/`` is always written)."""
    save_total_limit: Annotated[int, Ge(1)] | None = field(default=None, metadata={RESUMABLE: True})
    """Keep only the newest N checkpoints."""
    seed: int = 42
    """Seeds model init, LoRA init, data order and every callback's generator."""
    bf16: bool | Literal["auto"] = "auto"
    """bfloat16 autocast of the forward and backward (weights, optimizer state, loss stay float32); ``auto`` = on where the device has bf16 units (CPU ``avx512_bf16`` / ``amx_bf16``, or CUDA), off elsewhere (emulated bf16 is slower)."""
    report_to: tuple[Literal[TRACKERS], ...] = field(default=(), metadata={RESUMABLE: True, NO_EFFECT: True})  # type: ignore[valid-type]
    """Experiment trackers through accelerate, e.g. ``[tensorboard]`` (logs under ``output_dir/runs``)."""
    save_on_signal: bool = field(default=True, metadata={RESUMABLE: True, NO_EFFECT: True})
    """On SIGTERM (what SLURM, Kubernetes and spot instances send) or SIGINT: finish the optimizer step, write a
    checkpoint, exit 143 / 130; a second SIGINT stops at once. false = the signal's default action (no save)."""
    max_nonfinite_steps: Annotated[int, Ge(0)] = field(default=10, metadata={RESUMABLE: True})
    """Optimizer steps whose gradient norm is NaN/Inf are skipped (no update, no scheduler step; the data
    moves on) and counted; more than this many stop the run with an error, checkpoints intact. Under
    DeepSpeed the engine has already applied the update: the first one stops the run."""
    resume_from_checkpoint: bool | str | None = field(default=None, metadata={RESUMABLE: True, NO_EFFECT: True})
    """``true``: continue from the newest checkpoint in ``output_dir`` (start fresh if there is none); a path: from that checkpoint."""

    def __post_init__(self) -> None:
        if self.max_steps == 0:
            raise ValueError("max_steps: got 0, expected -1 (use num_train_epochs) or a positive number of steps")
        if self.resume_from_checkpoint is False:
            object.__setattr__(self, "resume_from_checkpoint", None)


class Objective(str, enum.Enum):
    KD = "kd"
    """KL(teacher ‖ student) of the next-token distributions at ``temperature`` (× T²), over every position."""
    BLOCK = "block"
    """Per decoder layer, in order: the relative squared error of the layer's output against the float layer's on the same inputs."""


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """Used by ``qaft tune`` and ``qaft run``'s tune stage: train the post-pass result's low-rank factors (codes frozen) against the float model."""

    steps: Annotated[int, Ge(0)] = 0
    """Optimizer steps; 0 = no tuning (``qaft run`` skips the stage and exports the post-pass result as solved)."""
    objective: Objective = Objective.KD
    """``kd``: distillation from the float model's next-token distributions, end to end; ``block``: layer by layer, each decoder layer's output against the float layer's on the same inputs (``steps`` split evenly over the layers)."""
    temperature: Annotated[float, Gt(0.0)] = 1.0
    """Distillation temperature T; the loss is scaled by T² so its gradients keep their size."""
    init: Literal["closed_form", "zero"] = "closed_form"
    """Start from the post-pass factors as saved (``closed_form``) or from fresh ones at ``postpass.rank`` (``zero``: lora_B = 0, lora_A random, as peft starts)."""
    train_scales: bool = False
    """Also train the per-channel / per-group weight scales (codes stay frozen); int schemes only."""
    scales_relative_lr: Annotated[float, Gt(0.0)] = 1e-3
    """With ``train_scales``: AdamW's peak learning rate for each layer's scales, as a fraction of the mean absolute value of its scales (about the share a step moves them); the factors' absolute rate would move 4-bit scales by percents per step."""
    data: str | None = None
    """Tuning text; null = the calibration text (``postpass.calibration_path``, else ``data.path``). Must not be the evaluation text."""
    seq_len: Annotated[int, Ge(8)] = 256
    """Tokens per tuning block."""
    batch_size: Annotated[int, Ge(1)] = 2
    """Blocks per micro-batch on each process."""
    gradient_accumulation_steps: Annotated[int, Ge(1)] = 1
    """Micro-batches per optimizer step."""
    learning_rate: Annotated[float, Gt(0.0)] = 4e-4
    """Peak learning rate of AdamW."""
    lr_scheduler_type: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    """Schedule from ``transformers.get_scheduler``."""
    warmup_ratio: Annotated[float, Ge(0.0), Le(1.0)] = 0.05
    """Share of steps with linear warm-up."""
    max_grad_norm: Annotated[float, Ge(0.0)] = 1.0
    """Clip the global gradient norm to this; 0 = no clipping."""
    gradient_checkpointing: bool = field(default=False, metadata={RESUMABLE: True})
    """Recompute each decoder layer's activations in the backward instead of holding them: for ``kd`` on SmolLM2-135M about a fifth less peak memory at ~1.4x the step time; the same gradients."""
    bf16: bool | Literal["auto"] = "auto"
    """bfloat16 autocast for the student and the teacher (the KD loss stays float32); ``auto`` = on where the device has bf16 units (CPU ``avx512_bf16`` / ``amx_bf16``, or CUDA), off elsewhere (emulated bf16 is slower than float32)."""
    eval_fraction: Annotated[float, Ge(0.0), Le(0.5)] = 0.05
    """Share of the tuning blocks, from the end of the text, held out: the loop reports the tuned model's perplexity on them."""
    max_eval_blocks: Annotated[int, Ge(1)] | None = 8
    """Keep only the first N held-out blocks."""
    eval_steps: Annotated[int, Ge(1)] | None = field(default=None, metadata={RESUMABLE: True})
    """Evaluate every N steps; null = only at the end."""
    logging_steps: Annotated[int, Ge(1)] = field(default=10, metadata={RESUMABLE: True, NO_EFFECT: True})
    """Log train metrics every N optimizer steps."""
    save_steps: Annotated[int, Ge(0)] = field(default=50, metadata={RESUMABLE: True})
    """Checkpoint every N steps (factors, optimizer, data position); 0 = none."""
    output_dir: str | None = field(default=None, metadata={NO_EFFECT: True})
    """The tuning run's folder (checkpoints, ``metrics.jsonl``, and ``final/``: the tuned post-pass result that ``qaft export`` reads); null = ``<training.output_dir>/tune``."""
    callbacks: tuple[Annotated[Spec, CALLBACKS], ...] = ()
    """Training callbacks that make sense on a quantized model (``telemetry``); the others are refused naming why."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """What ``qaft train`` reads: the model, its data, the adapter, the loop, the scheme it trains for, the callbacks."""

    model: ModelConfig
    """The model to fine-tune."""
    data: DataConfig
    """Training text."""
    lora: LoraSection = field(default_factory=LoraSection)
    """LoRA adapter."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """The optimisation loop."""
    quant: QuantScheme = field(default_factory=QuantScheme)
    """The quantization scheme the run targets (callbacks and post-pass read it)."""
    callbacks: tuple[Annotated[Spec, CALLBACKS], ...] = ()
    """Ordered list of training callbacks, each ``{name: ..., <options>}``."""

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for i, spec in enumerate(self.callbacks):
            if spec.name in seen:
                raise ValueError(f"callbacks[{i}].name: {spec.name!r} is listed twice; each callback may appear once")
            seen.add(spec.name)
        for spec in self.callbacks:
            for other, why in CALLBACKS.get(spec.name).conflicts.items():
                if other in seen:
                    raise ValueError(f"callbacks: {spec.name} cannot be combined with {other}: {why}")

    def training_part(self) -> dict[str, Any]:
        """The plain tree of this class's own sections (what a checkpoint stores), also when called on the root config."""
        return {name: to_plain(getattr(self, name)) for name in TrainConfig.__dataclass_fields__}


RESUMABLE_CHANGES = frozenset(flagged_keys(TrainConfig, RESUMABLE))
"""Dotted keys a checkpoint may be resumed under with another value (marked ``RESUMABLE`` beside each field)."""
NO_EFFECT_KEYS = frozenset(flagged_keys(TrainConfig, NO_EFFECT))
