"""The callback protocol: one typed context, named events, effects only through return values.

Compared with transformers' ``TrainerCallback``: hooks take one typed ``Context`` instead of
``**kwargs``, a callback can add loss terms (``loss_terms``) and edit gradients at one defined
point (``on_gradients``: after the synced backward, before clipping), and it owns a seeded
``torch.Generator`` so it never perturbs the global RNG (which would break exact resume).

Order of events for one optimizer step with gradient accumulation G::

    on_step_begin → (forward, loss_terms, backward) × G → on_gradients → clip, optimizer step
    → on_step_end → [eval → on_evaluate] → [checkpoint]

framed by ``on_train_begin`` / ``on_train_end``. The base class is all no-ops.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from qaft.core.registry import NoOptions
from qaft.quant.scheme import QuantScheme


@dataclass
class TrainState:
    """The loop's mutable counters; saved in every checkpoint as ``trainer_state.json``."""

    step: int = 0
    """Optimizer steps completed."""
    max_steps: int = 0
    """Optimizer steps this run will take in total."""
    micro_batches: int = 0
    """Micro-batches consumed by this process (the data position for exact resume)."""
    epoch: int = 0
    """Passes over the training blocks started so far, counted from 0."""
    tokens_seen: int = 0
    """Training tokens consumed by all processes together."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite gradient (``training.max_nonfinite_steps``); not counted in ``step``."""


@dataclass(frozen=True)
class Context:
    """Everything a hook may read. Fields are fixed; ``state`` is the loop's, read it, don't write it."""

    accelerator: Any
    """The run's ``accelerate.Accelerator``."""
    model: torch.nn.Module
    """The PEFT model as prepared by accelerate (use ``accelerator.unwrap_model`` for attributes)."""
    optimizer: torch.optim.Optimizer
    scheme: QuantScheme
    """The quantization scheme the run trains for (``quant``)."""
    seed: int
    """The run seed (``training.seed``): derive any draw that must be the same on every rank and after a resume from it."""
    output_dir: Path
    """The run folder (``training.output_dir``), for a callback's own artefacts (MAT's heatmap)."""
    state: TrainState
    probe_blocks: torch.Tensor | None = None
    """``[n, block_size]`` training token ids in corpus order (not shuffled), for callbacks that measure
    the model (NPFT's Fisher, MAT's probes): take the first N, identical on every rank and every resume."""


class Callback:
    """Base class: override the hooks you need, set ``name`` and ``Options``, then ``CALLBACKS.register`` it."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    conflicts: ClassVar[Mapping[str, str]] = {}
    """Callbacks this one cannot run beside, each with the reason (checked when the config loads)."""

    def __init__(self, options: Any, *, generator: torch.Generator):
        self.options = options
        self.generator = generator

    @classmethod
    def sharded_weights_problem(cls, options: Any) -> str | None:
        """Why this callback cannot run while weights are sharded across processes (DeepSpeed ZeRO-3,
        FSDP), or None. ``qaft doctor`` reports it before a launch; the default assumes it only reads
        what the loop hands it."""
        return None

    @classmethod
    def engine_step_problem(cls, options: Any) -> str | None:
        """Why this callback cannot run where the optimizer step happens inside the backward pass and
        gradients live in the engine's buffers, not ``p.grad`` (DeepSpeed, any ZeRO stage), or None.
        There ``on_gradients`` still runs, but after the step."""
        return None

    @classmethod
    def quantized_base_problem(cls, options: Any) -> str | None:
        """Why this callback cannot run in ``qaft tune``, where the base is already quantized (frozen integer
        codes) and only the ``QuantLinear`` layers' low-rank factors train, or None."""
        return None

    @classmethod
    def neutral_options(cls) -> Any:
        """Options under which the callback leaves training bit-identical (contract-tested)."""
        return cls.Options()

    def on_train_begin(self, ctx: Context) -> None: ...

    def on_step_begin(self, ctx: Context) -> None: ...

    def loss_terms(self, ctx: Context, batch: Mapping[str, torch.Tensor], outputs: Any) -> dict[str, torch.Tensor]:
        """Extra loss terms for this micro-batch; the loop adds them to the task loss, logged as ``loss/<name>/<term>``."""
        return {}

    def on_gradients(self, ctx: Context) -> None:
        """Gradients are synced and complete; mask or scale them in place (no other edits)."""

    def on_step_end(self, ctx: Context) -> dict[str, float]:
        """Metrics to log for this step, as ``<name>/<key>``."""
        return {}

    def on_evaluate(self, ctx: Context, metrics: Mapping[str, float]) -> dict[str, float]:
        """Extra eval metrics, given the loop's own (``eval_loss``, ``eval_ppl``)."""
        return {}

    def on_train_end(self, ctx: Context) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly; subclasses extend this dict."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
