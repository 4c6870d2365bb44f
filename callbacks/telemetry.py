"""Weight and gradient telemetry: read-only numbers that tell whether adapter training is healthy.

Logs, every ``every`` steps: the gradient norm of the ``lora_A`` and ``lora_B`` factors separately
(before clipping, as the optimizer would see them if no clipping happened), the trainable weight
norm, and the relative update ``‖Δθ‖ / ‖θ‖`` of the step. ``lora_B`` starts at zero, so an A/B
gradient ratio that stays extreme, or an update ratio far above ~1e-2, flags a bad learning rate
long before the loss does. It never writes to the model, so it is a no-op for training.

Under DeepSpeed the engine steps inside backward and keeps gradients in its own buffers, so the
A/B gradient norms are left out (the loop's ``grad_norm`` is the engine's global norm); weight
norm and update ratio are still logged. Under ZeRO-3 it is refused: it reads whole adapter tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch

from qaft.core.typed import Ge

from .base import Callback, Context
from .registry import CALLBACKS


@dataclass(frozen=True, kw_only=True)
class TelemetryOptions:
    every: Annotated[int, Ge(1)] = 1
    """Measure on every ``every``-th optimizer step."""


def _norm(tensors: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors])).item() if tensors else 0.0


class Telemetry(Callback):
    name = "telemetry"
    Options = TelemetryOptions

    @classmethod
    def sharded_weights_problem(cls, options: TelemetryOptions) -> str | None:
        return "it reads whole adapter tensors to measure their norms, and each process holds only a shard of them"

    def __init__(self, options: TelemetryOptions, *, generator: torch.Generator):
        super().__init__(options, generator=generator)
        self._before: list[torch.Tensor] | None = None
        self._grads: dict[str, float] = {}

    def _params(self, ctx: Context) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]

    def on_step_begin(self, ctx: Context) -> None:
        active = (ctx.state.step + 1) % self.options.every == 0
        self._before = [p.detach().clone() for _, p in self._params(ctx)] if active else None

    def on_gradients(self, ctx: Context) -> None:
        if self._before is None:
            return
        params = self._params(ctx)
        if all(p.grad is None for _, p in params):  # DeepSpeed: no p.grad to read (see the module docstring)
            self._grads = {}
            return
        self._grads = {f"grad_norm/{part}": _norm([p.grad for n, p in params if part in n and p.grad is not None]) for part in ("lora_A", "lora_B")}

    def on_step_end(self, ctx: Context) -> dict[str, float]:
        if self._before is None:
            return {}
        now = [p.detach() for _, p in self._params(ctx)]
        weight = _norm(now)
        update = _norm([a - b for a, b in zip(now, self._before)])
        self._before = None
        return {**self._grads, "weight_norm": weight, "update_ratio": update / max(weight, 1e-12)}


CALLBACKS.register(Telemetry)
